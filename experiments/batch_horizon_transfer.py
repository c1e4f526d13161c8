"""End to end across tokens and batch: a proxy sweep, `mupfast transfer` to a target that trains 4×
longer on a 2× larger batch and is 2× wider, and the target's own lr grid around the transferred lr.

    python -m experiments.batch_horizon_transfer --out docs/results --name batch-horizon-transfer \\
        [--horizon-fit runs/horizon-mup-lr/horizon_test.json --batch-fit runs/batch-mup/batch_test.json]

1. **Proxy**: ``configs/proxy-cpu.yaml`` (d=64, 200 steps of 16 × 128 tokens, weight decay 0.1);
   ``mupfast sweep`` over the lr alone (TPE, ``--trials``), its best stable trial.
2. **Transfer**: ``mupfast transfer`` of that trial to d=128 (m = 2), 800 steps (T × 8 with the
   batch), 32 sequences a step (B × 2): the rule η = lr·(B/B0)^β·(T/T0)^-α and the weight decay's
   timescale rule, with the default exponents, and with the fitted ones when fit files are given.
3. **Target**: the transferred config itself; the same with the lr and weight decay copied unchanged
   (the old behaviour); and the target's own lr grid around the transferred lr in half octaves, at
   the transferred weight decay — every point at ``--seeds`` seeds. The question: is the transferred
   config's val loss within 0.5% of the grid's best, and the copied one's?
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

from mupfast.checks.results import write_result_files
from mupfast.cli import main as cli
from mupfast.config import load_config, with_overrides
from mupfast.optim import base_lr
from mupfast.optim.groups import base_weight_decay
from mupfast.tuning.launch import Point, grid_run_overrides, mean_loss, run_points

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "configs" / "proxy-cpu.yaml"
TARGET = ROOT / "configs" / "target-cpu.yaml"
PROXY_OVERRIDES = ["optim.weight_decay=0.1"]
TARGET_OVERRIDES = [
    "model.hidden_size=128",
    "model.filter_size=512",
    "model.num_heads=4",
    "train.steps=800",
    "train.micro_batch_size=32",
    "optim.weight_decay=0.1",
]
SPACE = {"lr": {"low": 2**-9, "high": 2**-3, "log": True}}
GRID_OCTAVES = (-1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 2.5)  # around the transferred lr (0: the config itself)


def run_sweep(runs: Path, trials: int) -> str:
    """The proxy's lr sweep (resumes: the study's budget is ``trials``); its storage URL."""
    runs.mkdir(parents=True, exist_ok=True)
    space = runs / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    url = f"sqlite:///{runs / 'proxy.db'}"
    argv = [
        "sweep",
        "--config",
        str(PROXY),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--sampler",
        "tpe",
    ]
    argv += ["--seed", "0", "--pruner", "none", "--study", "proxy", "--storage", url, "--threads", "1"]
    argv += ["--sweep-dir", str(runs / "sweep"), *PROXY_OVERRIDES]
    if cli(argv) != 0:
        sys.exit("the proxy sweep failed")
    return url


def write_targets(runs: Path, url: str, fits: dict[str, str]) -> dict[str, Path]:
    """``mupfast transfer`` of the best trial: with the default exponents, and with the fitted ones."""
    written = {}
    for name, extra in [
        ("rule", []),
        *([("rule-fitted", [a for k, v in fits.items() for a in (k, v)])] if fits else []),
    ]:
        out = runs / "transfer" / name
        argv = ["transfer", "--storage", url, "--study", "proxy", "--target", str(TARGET), "--out", str(out)]
        if cli([*argv, "--top-k", "1", *extra, *TARGET_OVERRIDES]) != 0:
            sys.exit(f"transfer ({name}) failed")
        (written[name],) = out.glob("*.yaml")
    return written


def target_points(runs: Path, configs: dict[str, Path], seeds: int) -> dict[str, list[Point]]:
    """label → its seeds' points: the transferred configs, the copy, the lr grid around the rule."""
    rule = load_config(configs["rule"])
    eta, lam = base_lr(rule), base_weight_decay(rule)
    own = {"optim.base_batch_tokens": 0, "optim.base_tokens": 0.0}  # train at the lr a point names
    variants = {name: load_config(path) for name, path in configs.items()}
    variants["copy"] = with_overrides(rule, own)  # lr and weight decay as the proxy had them
    for k in GRID_OCTAVES:
        variants[f"grid{k:+g}"] = with_overrides(
            rule, {**own, "optim.lr": eta * 2**k, "optim.weight_decay": lam}
        )
    points = {}
    for name, cfg in variants.items():
        points[name] = []
        for s in range(seeds):
            run_dir = runs / "target" / name / f"seed{s}"
            pcfg = with_overrides(cfg, grid_run_overrides(cfg.train.seed + s, run_dir))
            points[name].append(Point(name, cfg.model.hidden_size, base_lr(pcfg), s, str(run_dir), pcfg))
    return points


def summarise(points: dict[str, list[Point]], losses: dict[str, float], sweep_best: dict) -> dict:
    rows = {}
    for name, pts in points.items():
        per_seed = [losses[p.run_dir] for p in pts]
        cfg = pts[0].cfg
        rows[name] = {
            "lr": base_lr(cfg),
            "log2_lr": math.log2(base_lr(cfg)),
            "weight_decay": base_weight_decay(cfg),
            "val_loss": mean_loss(per_seed),
            "val_loss_per_seed": per_seed,
            "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
        }
    grid = {k: v for k, v in rows.items() if k.startswith("grid") or k == "rule"}
    best_name = min(grid, key=lambda k: grid[k]["val_loss"])
    best = grid[best_name]["val_loss"]
    gaps = {k: 100 * (v["val_loss"] - best) / best for k, v in rows.items()}
    return {"rows": rows, "grid_best": best_name, "gap_pct": gaps, "proxy_best_trial": sweep_best}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    grid = sorted(
        (v["log2_lr"], v["val_loss"], k) for k, v in rows.items() if k.startswith("grid") or k == "rule"
    )
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    ax.plot(
        [g[0] for g in grid],
        [g[1] for g in grid],
        "o-",
        color="tab:gray",
        label="the target's lr grid (mean)",
    )
    for v in rows.values():
        ax.plot(
            [v["log2_lr"]] * len(v["val_loss_per_seed"]), v["val_loss_per_seed"], ".", color="tab:gray", ms=3
        )
    marks = {"rule": ("tab:blue", "transferred: rule, α=0.32 β=0.5"), "rule-fitted": ("tab:green", "transferred: fitted α, β"),
             "copy": ("tab:red", "lr and wd copied unchanged")}  # fmt: skip
    for k, (color, label) in marks.items():
        if k in rows:
            v = rows[k]
            ax.plot(
                v["log2_lr"],
                v["val_loss"],
                "D",
                color=color,
                ms=8,
                label=f"{label}: {v['val_loss']:.4f} ({result['gap_pct'][k]:+.2f}%)",
            )
    ax.set_xlabel("log2 lr at the target (η)")
    ax.set_ylabel("val loss (mean of seeds; dots: seeds)")
    t = result["target"]
    ax.set_title(
        f"d=64, 200 steps × 16 seqs → d={t['hidden_size']}, {t['steps']} steps × {t['sequences']} seqs",
        fontsize=10,
    )
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/batch-horizon-transfer")
    p.add_argument("--out", default="runs/batch-horizon-transfer")
    p.add_argument("--name", default="batch-horizon-transfer")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--horizon-fit")
    p.add_argument("--batch-fit")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    url = run_sweep(runs, args.trials)
    fits = {k: v for k, v in (("--horizon-fit", args.horizon_fit), ("--batch-fit", args.batch_fit)) if v}
    configs = write_targets(runs, url, fits)
    points = target_points(runs, configs, args.seeds)
    losses = run_points([pt for pts in points.values() for pt in pts], jobs=args.jobs, desc="target")
    import optuna

    study = optuna.load_study(study_name="proxy", storage=url)
    best = {"lr": study.best_trial.params["lr"], "val_loss": study.best_value, "trials": len(study.trials)}
    result = summarise(points, losses, best)
    rule = load_config(configs["rule"])
    result["target"] = {
        "hidden_size": rule.model.hidden_size,
        "steps": rule.train.steps,
        "sequences": rule.train.micro_batch_size,
    }
    result["fits"] = fits
    result["configs"] = {k: str(v) for k, v in configs.items()}
    js, png = write_result_files(result, args.out, args.name, plot)
    for k, v in sorted(result["rows"].items(), key=lambda kv: kv[1]["log2_lr"]):
        print(
            f"{k:>12}  lr 2^{v['log2_lr']:+.2f}  wd {v['weight_decay']:.4g}  val {v['val_loss']:.4f} ± {v['seed_std'] or 0:.4f}  ({result['gap_pct'][k]:+.2f}% vs the grid's best)"
        )
    print(json.dumps({"grid_best": result["grid_best"]}), f"wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
