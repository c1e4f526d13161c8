"""Parametrizations against each other at equal model size, tokens and steps, each at its best lr.

Reads a ``transfer-test`` result (JSON dict): at every size, every parametrization's optimum on its
own lr grid (mean over seeds), with the per-seed val losses there, their spread, and the measured
throughput of those runs (``tokens_per_s`` from each run's summary when the run directories
are at hand: hyperp's Muon step costs more than AdamW's, so equal tokens is not equal wall time).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from mupfast import rundir
from mupfast.checks.results import LABELS
from mupfast.tuning.launch import grid_run_dir


def _speed(run_dirs: list[Path]) -> float | None:
    """Mean tokens/s of the runs that finished (their summaries), None if none did."""
    speeds = [(rundir.read_summary(d) or {}).get("tokens_per_s") for d in run_dirs]
    speeds = [v for v in speeds if isinstance(v, (int, float))]
    return statistics.mean(speeds) if speeds else None


def best_per_size(result: dict, out: str | Path | None = None) -> dict[str, Any]:
    """size → parametrization → {lr, val_loss (mean), per_seed, seed_std, tokens_per_s}; plus the gaps.

    ``gap`` at a size is each parametrization's mean best val loss minus the lowest one there, and
    ``gap_in_seed_std`` that gap over the larger seed std of the two (≥ 2: more than seed noise).
    """
    axis, rows = result["axis"], {}
    for size in result["sizes"]:
        row: dict[str, Any] = {}
        for p, r in result["results"].items():
            curve = r["curves"][str(size)]
            o = curve["optimum"]
            if o["index"] is None:
                row[p] = None
                continue
            per_seed = curve["val_loss_per_seed"][o["index"]]
            lrs = r.get("lrs", result["lrs"])
            entry = {
                "lr": lrs[o["index"]],
                "lr_at_edge": o["at_edge"],
                "val_loss": o["loss"],
                "per_seed": per_seed,
                "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                "tokens_per_s": None,
            }
            if out is not None:
                entry["tokens_per_s"] = _speed(
                    [grid_run_dir(out, p, axis, size, entry["lr"], s) for s in range(len(per_seed))]
                )
            row[p] = entry
        done = {p: e for p, e in row.items() if e is not None}
        if done:
            lowest = min(e["val_loss"] for e in done.values())
            winner = min(done, key=lambda p: done[p]["val_loss"])
            for p, e in done.items():
                e["gap"] = e["val_loss"] - lowest
                stds = [x for x in (e["seed_std"], done[winner]["seed_std"]) if x]
                e["gap_in_seed_std"] = e["gap"] / max(stds) if stds and p != winner else None
        rows[str(size)] = row
    return {
        "axis": axis,
        "steps": result["steps"],
        "tokens": result["steps"] * result["tokens_per_step"],
        "seeds": result["seeds"],
        "sizes": result["sizes"],
        "best": rows,
    }


def markdown_table(cmp: dict, parametrizations: list[str] | None = None) -> str:
    """One row per size: each parametrization's best val loss ± seed std at its lr, and tokens/s."""
    params = parametrizations or list(next(iter(cmp["best"].values())))
    head = (
        f"| {cmp['axis']} | " + " | ".join(f"{LABELS.get(p, p)}: best val loss (lr)" for p in params) + " |"
    )
    lines = [head, "|" + "---|" * (len(params) + 1)]
    for size, row in cmp["best"].items():
        cells = []
        for p in params:
            e = row.get(p)
            if e is None:
                cells.append("—")
                continue
            std = f" ± {e['seed_std']:.3f}" if e["seed_std"] is not None else ""
            speed = f", {e['tokens_per_s']:,.0f} tok/s" if e.get("tokens_per_s") else ""
            edge = "*" if e["lr_at_edge"] else ""
            cells.append(f"{e['val_loss']:.3f}{std} (2^{math.log2(e['lr']):g}{edge}{speed})")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
