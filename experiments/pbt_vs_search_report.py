"""The table, JSON and picture of ``experiments/pbt_vs_search.sh``: PBT against random search and TPE.

For each seed directory (``runs/pbt-vs-search`` and its ``seed*/``): the best proxy val loss of each
method (for the sweeps, the best stable trial, the one ``mupfast transfer`` carries), the proxy
tokens it took, and the val loss of that result trained at the target. Writes
``docs/results/pbt-vs-search.json`` and ``docs/img/pbt-vs-search.png`` and prints a markdown table.

    python -m experiments.pbt_vs_search_report [--runs runs/pbt-vs-search]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mupfast import rundir

METHODS = ("random", "tpe", "pbt")


def _target_val(out: Path, method: str) -> float | None:
    runs = sorted((out / f"target-{method}").glob("*-run"))
    return _summary_val(runs[0]) if runs else None


def _summary_val(run_dir: Path) -> float | None:
    summary = rundir.read_summary(run_dir)
    return summary["final_val_loss"] if summary is not None else None


def _sweep_best(out: Path, method: str) -> dict | None:
    from mupfast.tuning.storage import load_study
    from mupfast.tuning.sweep.report import collect, rank

    db = out / f"{method}.db"
    if not db.is_file():
        return None
    study = load_study(f"sqlite:///{db}", f"pbt-cpu-{method}")
    ranked, _ = rank(collect(study), 1)
    if not ranked:
        return None
    best = ranked[0]
    return {"proxy_val": best.value, "params": best.params, "trials": len(study.trials)}


def _pbt_best(out: Path) -> dict | None:
    path = out / "pbt" / "report" / "lineage.json"
    if not path.is_file():
        return None
    lin = json.loads(path.read_text())
    return {
        "proxy_val": lin["best_val"],
        "final_params": lin["final_hparams"],
        "piecewise": lin["piecewise"],
        "lineage_members": [e["member"] for e in lin["lineage"]],
    }


def collect_runs(root: Path) -> list[dict]:
    seeds = []
    for out in [root, *sorted(root.glob("seed*"))]:
        # the root holds the script's default seed (SEED=2026), seedNNNN/ the others
        row: dict = {"dir": str(out), "seed": int(out.name[4:]) if out.name.startswith("seed") else 2026}
        for method in METHODS:
            best = _pbt_best(out) if method == "pbt" else _sweep_best(out, method)
            if best is None:
                continue
            best["target_val"] = _target_val(out, method)
            if method == "pbt":  # the ablation: the lineage's values at the target without its lr schedule
                best["target_val_without_schedule"] = _summary_val(out / "target-pbt-nopiecewise" / "run")
            row[method] = best
        seeds.append(row)
    return seeds


def summarise(seeds: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        for key in ("proxy_val", "target_val", "target_val_without_schedule"):
            vals = [s[method][key] for s in seeds if method in s and s[method].get(key) is not None]
            if vals:
                out.setdefault(method, {})[key] = {
                    "mean": statistics.fmean(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                    "values": vals,
                }
    return out


def markdown(seeds: list[dict], summary: dict) -> str:
    lines = [
        "| method | proxy val (best) per seed | mean | target val per seed | mean |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        s = summary.get(method, {})
        p, pm = _cells(s, "proxy_val")
        t, tm = _cells(s, "target_val")
        lines.append(f"| {method} | {p} | {pm} | {t} | {tm} |")
    ablation = summary.get("pbt", {}).get("target_val_without_schedule")
    if ablation:
        values = " / ".join(f"{v:.4f}" for v in ablation["values"])
        lines.append(f"| pbt without its lr schedule | | | {values} | **{ablation['mean']:.4f}** |")
    return "\n".join(lines)


def _cells(s: dict, key: str) -> tuple[str, str]:
    if key not in s:
        return "–", "–"
    return " / ".join(f"{v:.4f}" for v in s[key]["values"]), f"**{s[key]['mean']:.4f}**"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=False)
    colors = {"random": "tab:gray", "tpe": "tab:blue", "pbt": "tab:green"}
    for ax, key, title in zip(
        axes, ("proxy_val", "target_val"), ("proxy d=64", "target d=256 (transferred)")
    ):
        for i, method in enumerate(METHODS):
            vals = summary.get(method, {}).get(key, {}).get("values", [])
            ax.scatter([i] * len(vals), vals, color=colors[method], s=30, zorder=3)
            if vals:
                ax.hlines(statistics.fmean(vals), i - 0.25, i + 0.25, color=colors[method], lw=2)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_xlim(-0.6, len(METHODS) - 0.4)
        ax.set_title(title)
        ax.set_ylabel("val loss")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        "PBT vs random search vs TPE at equal proxy compute (8 × 200 steps; dots: seeds, bars: means)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/pbt-vs-search")
    p.add_argument("--json", default="docs/results/pbt-vs-search.json")
    p.add_argument("--png", default="docs/img/pbt-vs-search.png")
    args = p.parse_args(argv)
    seeds = collect_runs(Path(args.runs))
    summary = summarise(seeds)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"seeds": seeds, "summary": summary}, indent=2))
    plot(summary, Path(args.png))
    print(markdown(seeds, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
