"""``mupfast transfer-compare --extend RESULT.json``: widen a finished study's SP grid.

SP tuned at the target is the baseline μTransfer must beat, and a grid that stops where SP's best
sits at an edge (or at one init std) flatters μTransfer. Widening it should not mean re-running the
proxy study and every target run: the result file already holds them. This trains only the SP
points of ``--sp-lrs × --sp-init-stds`` that the result lacks, from the target config the result
recorded (the same runs the original study would have made: same config, same seed offsets), keeps
every other entry as it was, and concludes again through :func:`~mupfast.tuning.transfer_compare.result.derive`.
Each extension is recorded under ``extensions`` (what it added, from which file, how long it took).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mupfast.checks.scaling import scaled_config
from mupfast.config import Config, config_from_dict
from mupfast.errors import ConfigError
from mupfast.tuning.launch import run_points
from mupfast.tuning.transfer_compare.result import derive
from mupfast.tuning.transfer_compare.runs import run_entry, sp_key, sp_points

#: What a file must hold to be extended: a transfer-compare result, not another check's JSON.
RESULT_KEYS = ("proxy", "target", "mutransfer", "mup_hand_set", "sp", "mup_lr_grid", "flops", "target_config")


def load_result(path: str | Path) -> dict[str, Any]:
    """A finished ``transfer-compare`` result; a one-line ConfigError for anything else."""
    try:
        r = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--extend: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"--extend: {path} is not JSON ({e})") from None
    missing = [k for k in RESULT_KEYS if not isinstance(r, dict) or k not in r]
    if missing:
        raise ConfigError(f"--extend: {path} is not a transfer-compare result (no {', '.join(missing)})")
    return r


def sp_target(r: dict[str, Any]) -> Config:
    """The SP target the study trained: its recorded μP target switched to SP at the same width."""
    target = config_from_dict(r["target_config"])
    m = target.model
    return scaled_config(
        target, parametrization="sp", width=m.hidden_size, base_width=m.mup_base_hidden_size or m.hidden_size
    )


def extend_sp_grid(
    r: dict[str, Any],
    *,
    source: str,
    out: str | Path,
    sp_lrs: Sequence[float] | None,
    sp_init_stds: Sequence[float] | None,
    jobs: int,
    progress: bool = True,
) -> dict[str, Any]:
    """``r`` with SP's grid widened to ``sp_lrs × sp_init_stds`` (each defaults to the values the grid
    already has); only the missing points train, under ``<out>/runs/sp/``."""
    from mupfast.data import prepare_sources

    grid = r["sp"]["grid"]
    lrs = list(sp_lrs or sorted({e["lr"] for e in grid}))
    stds = list(sp_init_stds or sorted({e["init_std"] for e in grid}))
    have = {e["key"] for e in grid}
    todo = [(std, lr) for std in stds for lr in lrs if sp_key(std, lr) not in have]
    base = sp_target(r)
    seeds = r["target"]["seeds"]
    runs = Path(out) / "runs" / "sp"
    groups = [sp_points(base, std, lr, runs, seeds) for std, lr in todo]
    t0 = time.perf_counter()
    if groups:
        prepare_sources(base.data, progress=progress)
    values = run_points(
        [pt for g in groups for pt in g], jobs=jobs, progress=progress, desc="transfer-compare SP grid"
    )
    added = [run_entry(g, values, key=sp_key(std, lr)) for (std, lr), g in zip(todo, groups)]
    r["sp"]["grid"] = sorted(grid + added, key=lambda e: (e["init_std"], e["lr"]))
    r.setdefault("extensions", []).append(
        {
            "from": source,
            "added": [e["key"] for e in added],
            "runs": sum(e["runs"] for e in added),
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
    )
    return derive(r)


def check_extend_flags(overrides: Sequence[str], config: str | None, target: str | None) -> None:
    """--extend takes its configs from the result; flags that would change them are refused."""
    if overrides:
        raise ConfigError(
            f"--extend: the configs come from the result file; drop the overrides ({' '.join(overrides)})"
        )
    for value, flag in ((config, "--config"), (target, "--target")):
        if value:
            raise ConfigError(f"--extend: the configs come from the result file; drop {flag}")
