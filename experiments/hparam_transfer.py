"""Does the optimum of one hyperparameter other than the lr stay put as the model gets wider?

``transfer-test`` grids the lr; this grids any other config key (default ``model.output_logits_alpha``)
at a fixed lr, at each width, under one parametrization, and writes the curves, each width's
optimum (grid and quadratic fit in log2, as transfer-test finds them) and the drift in grid steps.
Written for #20's question of why a transferred proxy lost to SP tuned at the target: it shows
whether the output multiplier's 1/m rule holds from d=64 to d=256 at the CPU pair's horizon.

    python -m experiments.hparam_transfer --out docs/results --name output-alpha-transfer \\
        --reference docs/results/transfer-compare/tpe.json

``--reference`` (a ``transfer-compare`` result) draws its SP-tuned-at-the-target loss as a line.
The base point (``--set``, default: μP equal to SP at the proxy width: embeddings × 1,
α_attn = √d_head, lr 2^-8, SP's best proxy lr) is held fixed; only ``--key`` varies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mupfast.checks.results import write_result_files
from mupfast.checks.scaling import scaled_config
from mupfast.checks.transfer_check import drift, find_optimum
from mupfast.config import load_config, with_overrides
from mupfast.flags import parse_float_list, parse_int_list, parse_lr, parse_positive_int
from mupfast.tuning.launch import Point, default_jobs, grid_run_overrides, mean_loss, run_points

#: μP that is SP at the proxy width (m = 1): embeddings × 1, attention 1/√d_head, SP's proxy-best lr.
SP_EQUIVALENT = ["model.embeddings_scale=1", "model.attention_logits_alpha=5.656854", "optim.lr=2^-8"]


def hparam_transfer(cfg, *, key: str, values, widths, seeds: int, runs: Path, jobs: int) -> dict:
    """Train every (width, value, seed) under ``runs`` (finished runs reused); the result dict."""
    base, name = min(widths), key.split(".")[-1]
    groups: dict[tuple[int, float], list[Point]] = {}  # (width, value) → its seeds' points
    for w in widths:
        scaled = scaled_config(cfg, parametrization=cfg.model.parametrization, width=w, base_width=base)
        for v in values:
            for s in range(seeds):
                run_dir = runs / f"width{w}" / f"{name}{v:g}" / f"seed{s}"
                pcfg = with_overrides(scaled, {key: v, **grid_run_overrides(cfg.train.seed + s, run_dir)})
                groups.setdefault((w, v), []).append(
                    Point(f"{name}={v:g}", w, pcfg.optim.lr, s, str(run_dir), pcfg)
                )
    t0 = time.perf_counter()
    got = run_points([p for pts in groups.values() for p in pts], jobs=jobs, desc="hparam-transfer")
    curves = {}
    for w in widths:
        per_seed = [[got[p.run_dir] for p in groups[w, v]] for v in values]
        losses = [mean_loss(x) for x in per_seed]
        opt = find_optimum(values, losses)  # its "lr" fields are the value of `key` here
        curves[str(w)] = {"val_loss": losses, "val_loss_per_seed": per_seed, "optimum": opt}
    return {
        "key": key,
        "values": list(values),
        "log2_values": [math.log2(v) for v in values],
        "widths": list(widths),
        "seeds": seeds,
        "parametrization": cfg.model.parametrization,
        "steps": cfg.train.steps,
        "tokens_per_step": cfg.train.tokens_per_step(),
        "curves": curves,
        "drift": drift([curves[str(w)]["optimum"] for w in widths]),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "base_config": cfg.to_dict(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.3))
    cmap = plt.get_cmap("viridis")
    ws = result["widths"]
    for i, w in enumerate(ws):
        c, color = result["curves"][str(w)], cmap(0.85 * i / max(1, len(ws) - 1))
        ax.plot(result["log2_values"], c["val_loss"], "o-", color=color, lw=1.6, ms=4, label=f"μP d={w}")
        o = c["optimum"]
        if o["index"] is not None:
            ax.plot(o["log2_lr"], o["loss"], "*", color=color, ms=15, mec="black", mew=0.7, zorder=5)
    ref = result.get("reference")
    if ref:
        ax.axhline(ref["sp_tuned"], color="tab:red", ls="--", lw=1.2,
                   label=f"SP, lr tuned at d={ref['width']}: {ref['sp_tuned']:.3f}")  # fmt: skip
        if ref.get("mutransfer") is not None:
            ax.axhline(ref["mutransfer"], color="tab:gray", ls=":", lw=1.2,
                       label=f"μTransfer's best at d={ref['width']}: {ref['mutransfer']:.3f}")  # fmt: skip
    name = result["key"].split(".")[-1]
    ax.set_xlabel(f"log2 {name} (base units: the logits are × {name}/m)")
    ax.set_ylabel(f"val loss after {result['steps']} steps ({result['seeds']} seeds)")
    ax.set_title(f"{name}: optimum drift {result['drift']['grid_steps']} grid step(s) from d={ws[0]} to d={ws[-1]}",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: the curves fill the box
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/proxy-cpu.yaml", help="the base (proxy) config")
    p.add_argument("--key", default="model.output_logits_alpha", help="the config key to grid")
    p.add_argument("--values", default="0.5,1,2,4,8", help="its values (default %(default)s)")
    p.add_argument("--widths", default="64,256", help="widths, the smallest is the μP base")
    p.add_argument("--seeds", default="2")
    p.add_argument("--set", nargs="*", default=SP_EQUIVALENT, help="overrides of the base point")
    p.add_argument("--reference", help="a transfer_compare.json to draw SP-tuned-at-target from")
    p.add_argument("--jobs", default=None)
    p.add_argument("--runs", default="runs/hparam-transfer", help="where the runs train")
    p.add_argument("--out", default="runs/hparam-transfer", help="where the JSON and PNG go")
    p.add_argument("--name", default="hparam_transfer")
    a = p.parse_args(argv)
    # load_config reads numbers itself; only the 2^k notation of the lr flags needs converting
    overrides = [
        f"{k}={parse_lr(v, '--set') if v.startswith('2^') else v}"
        for k, v in (s.split("=", 1) for s in a.set)
    ]
    cfg = load_config(a.config, overrides)
    values = parse_float_list(a.values, "--values")
    result = hparam_transfer(
        cfg,
        key=a.key,
        values=values,
        widths=sorted(parse_int_list(a.widths, "--widths")),
        seeds=parse_positive_int(a.seeds, "--seeds"),
        runs=Path(a.runs),
        jobs=parse_positive_int(a.jobs, "--jobs") if a.jobs else default_jobs(),
    )
    result["overrides"] = overrides
    if a.reference:
        ref = json.loads(Path(a.reference).read_text())
        result["reference"] = {
            "file": a.reference,
            "width": ref["target"]["width"],
            "sp_tuned": ref["best"]["sp"],
            "mutransfer": ref["best"]["mutransfer"],
        }
    js, png = write_result_files(result, a.out, a.name, plot)
    for w in result["widths"]:
        o = result["curves"][str(w)]["optimum"]
        print(f"d={w}: best {a.key} = {o['lr']:g} (fit 2^{o['fit_log2_lr']:.2f}), val loss {o['loss']:.4f}")
    print(f"drift {result['drift']['grid_steps']} grid step(s); wrote {js} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
