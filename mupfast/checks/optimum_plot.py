"""The summary lines and picture of horizon-test and batch-test: loss against the gridded value per
scale, and the fit of its optimum against the scale beside the reference exponent."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mupfast.tuning.launch import mean_loss

#: Per check: the scale axis's result key, its label, the fitted exponent's name and sign (v* ∝ x^(sign·e)).
AXES = {
    "horizon-test": ("horizons_steps", "steps", "log2 training tokens T", "α", -1),
    "batch-test": ("batches", "batch", "log2 tokens per step B", "β", +1),
}
GRID_SYMBOL = {"lr": "η*", "weight_decay": "λ*"}
REFERENCE_NAME = {
    "horizon-test": {"lr": "HyperP", "weight_decay": "timescale rule"},
    "batch-test": {"lr": "√B"},
}


def _axis(result: dict) -> tuple[str, str, str, str, int]:
    return AXES[result.get("check", "horizon-test")]


def _grid(result: dict) -> tuple[str, list[float]]:
    grid = result.get("grid", "lr")
    return grid, result.get("log2_grid_values") or result["log2_lrs"]


def summary_lines(result: dict) -> list[str]:
    """The optimum per scale, the exponent against the reference, and the drift with and without it."""
    f = result["fit"]
    key, unit, _, name, sign = _axis(result)
    grid, _ = _grid(result)
    sym, col = GRID_SYMBOL[grid], "lr" if grid == "lr" else "wd"
    tokens = result["tokens"] if unit == "steps" else result["batch_tokens"]
    lines = [
        f"{unit:>6} {'tokens':>11} {sym + ' (fit)':>10} {'±octaves':>9} {'best grid ' + col:>12} {'val loss':>9}"
    ]
    for h, tok, o, b in zip(result[key], tokens, f["optima"], result["best"]):
        edge = " (edge of grid)" if o["at_edge"] else ""
        lines.append(
            f"{h:>6} {tok:>11,} {2 ** o['log2_lr']:>10.4g} {o['sigma_log2']:>9.2f} {b[grid]:>12.4g} "
            f"{b['val_loss']:>9.4f}{edge}"
        )
    lines.append(
        f"{name} = {f['alpha' if name == 'α' else 'exponent']:.3f} ± {f['sigma']:.3f} (bootstrap over seeds "
        f"{f['sigma_boot']:.3f}, fit {f['sigma_fit']:.3f}, χ²/dof {f['chi2_per_dof']:.2f}) against "
        f"{f['reference']:g}: {f['z']:+.1f} σ"
    )
    d = f.get("drift")
    if d:
        lines.append(
            f"{sym} moved {d['octaves']:+.2f} ± {d['sigma']:.2f} octaves over {d['axis_octaves']:.0f} octaves of "
            f"{unit}; after the rule with {name} = {f['reference']:g}: {d['after_reference_rule']:+.2f}"
        )
    return lines


def plot_optimum(result: dict, path: str | Path) -> None:
    """Left: val loss vs the gridded value per scale with the optimum; right: its log2 vs log2 scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    _loss_curves(ax, result)
    _optima_fit(bx, result)
    m = result["model"]
    per = (
        f"{result['tokens_per_step']} tokens/step"
        if "tokens_per_step" in result
        else f"{result['tokens']:,} tokens"
    )
    fixed = f", lr {result['fixed_lr']:.4g}" if result.get("fixed_lr") else ""
    fig.suptitle(
        f"{result.get('check', 'horizon-test')}, {result['parametrization']}: d={m['hidden_size']}, "
        f"{m['num_layers']} layer(s), {per}{fixed}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_curves(ax, result: dict) -> None:
    import matplotlib.pyplot as plt

    f = result["fit"]
    key, unit, *_ = _axis(result)
    grid, xs = _grid(result)
    cmap = plt.get_cmap("viridis")
    n = len(result[key])
    top = 0.3  # Δ loss shown; the scales' levels differ by far more than their curves' depth
    for k, (h, curve, o) in enumerate(zip(result[key], result["val_loss"], f["optima"])):
        color = cmap(0.9 * k / max(1, n - 1))
        ys = [mean_loss(v) for v in curve]
        best = min(y for y in ys if math.isfinite(y))
        shown = [(x, min(y - best, top)) for x, y in zip(xs, ys) if math.isfinite(y)]
        ax.plot(*zip(*shown), "o-", color=color, ms=3.5, lw=1.4, label=f"{unit} {h} (best {best:.3f})")
        dots = [(x, min(y - best, top)) for x, v in zip(xs, curve) for y in v if math.isfinite(y)]
        if dots:
            ax.plot(*zip(*dots), ".", color=color, ms=2, alpha=0.5)
        ax.axvline(o["log2_lr"], color=color, lw=0.8, ls=":")
    hyperp = "  (hyperp: η = η0, base = own B, L, T)" if result["parametrization"] == "hyperp" else ""
    ax.set_xlabel(f"log2 {'lr' if grid == 'lr' else 'weight decay'}{hyperp}")
    ax.set_ylabel(f"val loss − the {unit}'s best (mean; dots: seeds)")
    ax.set_ylim(-0.05, top + 0.02)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(f"loss vs {grid} per {unit} (dotted: fitted optimum; capped at +0.3)", fontsize=10)


def _optima_fit(bx, result: dict) -> None:
    f = result["fit"]
    _, _, label, name, sign = _axis(result)
    grid, _ = _grid(result)
    exponent = f["alpha"] if name == "α" else f["exponent"]
    lx = np.asarray(f.get("log2_tokens") or f["log2_axis"])
    ly = [o["log2_lr"] for o in f["optima"]]
    sym = GRID_SYMBOL[grid]
    bx.errorbar(
        lx,
        ly,
        yerr=[o["sigma_log2"] for o in f["optima"]],
        fmt="o",
        color="black",
        capsize=3,
        label=f"{sym} per scale",
    )
    xs = np.linspace(lx.min() - 0.3, lx.max() + 0.3, 10)
    bx.plot(
        xs,
        f["c"] + sign * exponent * xs,
        "-",
        color="tab:blue",
        label=f"fit: {name} = {exponent:.2f} ± {f['sigma']:.2f}",
    )
    mid = float(np.mean(lx))
    at_mid = f["c"] + sign * exponent * mid
    ref = REFERENCE_NAME.get(result.get("check", "horizon-test"), {}).get(grid, "reference")
    bx.plot(
        xs,
        at_mid + sign * f["reference"] * (xs - mid),
        "--",
        color="tab:red",
        label=f"{name} = {f['reference']:g} ({ref})",
    )
    bx.set_xlabel(label)
    bx.set_ylabel(f"log2 optimal {grid} {sym}")
    bx.grid(alpha=0.3, lw=0.5)
    bx.legend(fontsize=8)
    power = f"^-{name}" if sign < 0 else f"^{name}"
    bx.set_title(f"{sym} ∝ x{power}  ({result['seeds']} seeds, bootstrap σ per point)", fontsize=10)
