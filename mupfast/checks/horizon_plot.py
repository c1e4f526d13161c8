"""The token-horizon check's summary lines and picture: loss against lr per horizon, and the fit
of log2 η* against log2 T beside the reference exponent."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mupfast.tuning.launch import mean_loss


def summary_lines(result: dict) -> list[str]:
    """The optimum per horizon, and α against the reference."""
    f = result["fit"]
    lines = [
        f"{'steps':>6} {'tokens':>9} {'η* (fit)':>10} {'±octaves':>9} {'best grid lr':>12} {'val loss':>9}"
    ]
    for h, tok, o, b in zip(result["horizons_steps"], result["tokens"], f["optima"], result["best"]):
        edge = " (edge of grid)" if o["at_edge"] else ""
        lines.append(
            f"{h:>6} {tok:>9,} {2 ** o['log2_lr']:>10.4g} {o['sigma_log2']:>9.2f} {b['lr']:>12.4g} "
            f"{b['val_loss']:>9.4f}{edge}"
        )
    lines.append(
        f"α = {f['alpha']:.3f} ± {f['sigma']:.3f} (bootstrap over seeds {f['sigma_boot']:.3f}, fit "
        f"{f['sigma_fit']:.3f}, χ²/dof {f['chi2_per_dof']:.2f}) against {f['reference']:g}: "
        f"{f['z']:+.1f} σ"
    )
    return lines


def plot_horizon(result: dict, path: str | Path) -> None:
    """Left: val loss vs log2 lr per horizon with the optimum; right: log2 η* vs log2 T and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, xs = result["fit"], result["log2_lrs"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    cmap = plt.get_cmap("viridis")
    n = len(result["horizons_steps"])
    top = 0.3  # Δ loss shown; the horizons' levels differ by far more than their curves' depth
    for k, (h, curve, o) in enumerate(zip(result["horizons_steps"], result["val_loss"], f["optima"])):
        color = cmap(0.9 * k / max(1, n - 1))
        ys = [mean_loss(v) for v in curve]
        best = min(y for y in ys if math.isfinite(y))
        shown = [(x, min(y - best, top)) for x, y in zip(xs, ys) if math.isfinite(y)]
        ax.plot(*zip(*shown), "o-", color=color, ms=3.5, lw=1.4, label=f"{h} steps (best {best:.3f})")
        dots = [(x, min(y - best, top)) for x, v in zip(xs, curve) for y in v if math.isfinite(y)]
        if dots:
            ax.plot(*zip(*dots), ".", color=color, ms=2, alpha=0.5)
        ax.axvline(o["log2_lr"], color=color, lw=0.8, ls=":")
    ax.set_xlabel(
        "log2 lr"
        + ("  (hyperp: η = η0, base = own B, L, T)" if result["parametrization"] == "hyperp" else "")
    )
    ax.set_ylabel("val loss − the horizon's best (mean; dots: seeds)")
    ax.set_ylim(-0.05, top + 0.02)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("loss vs lr per horizon (dotted: fitted optimum; capped at +0.3)", fontsize=10)

    lx = np.asarray(f["log2_tokens"])
    ly = [o["log2_lr"] for o in f["optima"]]
    bx.errorbar(
        lx,
        ly,
        yerr=[o["sigma_log2"] for o in f["optima"]],
        fmt="o",
        color="black",
        capsize=3,
        label="η* per horizon",
    )
    grid = np.linspace(lx.min() - 0.3, lx.max() + 0.3, 10)
    bx.plot(
        grid,
        f["c"] - f["alpha"] * grid,
        "-",
        color="tab:blue",
        label=f"fit: α = {f['alpha']:.2f} ± {f['sigma']:.2f}",
    )
    mid = float(np.mean(lx))
    at_mid = f["c"] - f["alpha"] * mid
    bx.plot(
        grid,
        at_mid - f["reference"] * (grid - mid),
        "--",
        color="tab:red",
        label=f"α = {f['reference']:g} (HyperP)",
    )
    bx.set_xlabel("log2 training tokens T")
    bx.set_ylabel("log2 optimal lr η*")
    bx.grid(alpha=0.3, lw=0.5)
    bx.legend(fontsize=8)
    bx.set_title(f"η* ∝ T^-α  ({result['seeds']} seeds, bootstrap σ per point)", fontsize=10)
    m = result["model"]
    fig.suptitle(
        f"token-horizon check, {result['parametrization']}: d={m['hidden_size']}, {m['num_layers']} layer(s), "
        f"{result['tokens_per_step']} tokens/step",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
