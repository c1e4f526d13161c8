"""The μTransfer test's table and picture: val loss against log2 lr, one curve per size, one panel per
parametrization (each on its own lr grid: hyperp's is the base η0)."""

from __future__ import annotations

import math
from pathlib import Path

from mupfast.checks.results import LABELS


def lr_axis_label(parametrization: str, axis: str) -> str:
    """What the lr grid of a parametrization sets (hyperp's is the base η0 of its transfer rule)."""
    if parametrization != "hyperp":
        return "log2 learning rate"
    return (
        "log2 η0  (η = η0·√(d0/L), d0 = smallest depth)"
        if axis == "depth"
        else "log2 η0  (= η at every width)"
    )


def _fmt_lr(log2_lr: float | None) -> str:
    return "—" if log2_lr is None else f"2^{log2_lr:g}"


def table_lines(result: dict) -> list[str]:
    """One line per parametrization: the optimum at each size and the drift."""
    lines = []
    axis = result["axis"]
    for p, r in result["results"].items():
        cells = []
        for size in result["sizes"]:
            o = r["curves"][str(size)]["optimum"]
            edge = "*" if o["at_edge"] else ""
            cells.append(f"{size}: {_fmt_lr(o['log2_lr'])}{edge}")
        d = r["drift"]
        drift_s = (
            "—" if d["grid_steps"] is None else f"{d['grid_steps']} grid steps (fit {d['fit_log2']:.2f})"
        )
        what = "η0" if p == "hyperp" else "lr"
        lines.append(
            f"{LABELS.get(p, p):>9}  optimum {what} by {axis}  " + "  ".join(cells) + f"   drift {drift_s}"
        )
    if any(
        r["curves"][str(s)]["optimum"]["at_edge"] for r in result["results"].values() for s in result["sizes"]
    ):
        lines.append("          * optimum at the edge of the lr grid: widen --lrs to be sure")
    return lines


def plot_transfer(result: dict, path: str | Path) -> None:
    """Val loss vs log2 lr, one curve per size, parametrizations side by side; a star on each optimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(result["results"])
    sizes = result["sizes"]
    finite = [
        v
        for r in result["results"].values()
        for c in r["curves"].values()
        for v in c["val_loss"]
        if math.isfinite(v)
    ]
    lo = min(finite) if finite else 0.0
    best_per_curve = [
        c["optimum"]["loss"]
        for r in result["results"].values()
        for c in r["curves"].values()
        if c["optimum"]["loss"]
    ]
    hi = min(max(finite) if finite else 1.0, (max(best_per_curve) if best_per_curve else lo) + 1.0)
    pad = 0.04 * max(hi - lo, 1e-3)
    top = hi + pad
    fig, axes = plt.subplots(1, len(params), figsize=(5.2 * len(params), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    colors = {s: cmap(0.9 * i / max(1, len(sizes) - 1)) for i, s in enumerate(sizes)}
    for ax, p in zip(axes[0], params):
        r = result["results"][p]
        xs = r.get("log2_lrs", result["log2_lrs"])
        for s in sizes:
            c = r["curves"][str(s)]
            ys = [min(v, top) if math.isfinite(v) else top for v in c["val_loss"]]
            ax.plot(xs, ys, "-", color=colors[s], lw=1.6, label=f"{result['axis']} {s}")
            ok = [(x, y) for x, y, v in zip(xs, ys, c["val_loss"]) if math.isfinite(v) and v <= top]
            bad = [(x, top) for x, v in zip(xs, c["val_loss"]) if not (math.isfinite(v) and v <= top)]
            if ok:
                ax.plot(*zip(*ok), "o", color=colors[s], ms=3.5)
            if bad:
                ax.plot(*zip(*bad), "x", color=colors[s], ms=6, mew=1.5)
            o = c["optimum"]
            if o["index"] is not None:
                ax.plot(o["log2_lr"], o["loss"], "*", color=colors[s], ms=14, mec="black", mew=0.7, zorder=5)
        d = r["drift"]
        drift_s = "—" if d["grid_steps"] is None else f"{d['grid_steps']}"
        ax.set_title(f"{LABELS.get(p, p)}: optimum drift {drift_s} grid step(s)", fontsize=11)
        ax.set_xlabel(lr_axis_label(p, result["axis"]), fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_ylim(lo - pad, top + pad)
    axes[0][0].set_ylabel(f"val loss after {result['steps']} steps")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"μTransfer test over {result['axis']}: {result['seeds']} seed(s), "
        f"{result['tokens_per_step'] * result['steps']:,} training tokens per run\n(× = diverged or off the chart)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
