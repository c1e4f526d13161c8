"""The coordinate check's verdict lines and picture: layer output size against width, one panel per
parametrization and step."""

from __future__ import annotations

import math
from pathlib import Path

from mupfast.checks.results import LABELS


def verdict_lines(result: dict) -> list[str]:
    """One line per parametrization and layer: the slope at the last step and the verdict."""
    lines = []
    tol = result["tolerance"]
    for p, pr in result["parametrizations"].items():
        for n, e in pr["layers"].items():
            last = e["slope_mean_abs"][-1]
            worst = e["max_abs_slope"]
            if p == "sp":
                word = "grows" if last > tol else ("shrinks" if last < -tol else "flat")
            else:
                word = "flat" if e["flat"] else "NOT FLAT"
            lines.append(
                f"{LABELS.get(p, p):>9}  {n:<12} slope at t={result['steps']}: {last:+.3f}   "
                f"max |slope| over t≥{result['judged_from']}: {worst:.3f}   {word}"
            )
        if p != "sp":
            ok = "PASS" if pr["all_flat"] else "FAIL"
            lines.append(f"{LABELS.get(p, p):>9}  every layer within |slope| ≤ {tol:g}: {ok}")
    return lines


def plot_coord_check(result: dict, path: str | Path, metric: str = "mean_abs") -> None:
    """Grid: rows = parametrizations, columns = steps; each panel size vs log2 width, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(result["parametrizations"])
    widths, names = result["widths"], result["layers"]
    ncols = result["steps"] + 1
    fig, axes = plt.subplots(
        len(params), ncols, figsize=(2.6 * ncols, 2.8 * len(params)), sharey="row", squeeze=False
    )
    cmap = plt.get_cmap("turbo")
    colors = {n: cmap(0.05 + 0.9 * i / max(1, len(names) - 1)) for i, n in enumerate(names)}
    xs = [math.log2(w) for w in widths]
    for r, p in enumerate(params):
        layers = result["parametrizations"][p]["layers"]
        for t in range(ncols):
            ax = axes[r][t]
            for n in names:
                ys = layers[n][metric][t]
                ax.plot(xs, ys, "o-", ms=3, lw=1.2, color=colors[n], label=n)
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(w) for w in widths], fontsize=7)
            ax.grid(alpha=0.3, which="both", lw=0.5)
            ax.set_title(f"{LABELS.get(p, p)}  t={t}" + (" (init)" if t == 0 else ""), fontsize=9)
            if t == 0:
                ax.set_ylabel({"mean_abs": "mean |x|", "rms": "RMS(x)"}[metric])
            if r == len(params) - 1:
                ax.set_xlabel("width (log2 axis)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    lrs = [f"lr {result['lr']:g}"] if set(result["parametrizations"]) - {"hyperp"} else []
    lrs += [f"HyperP η {result['hyperp_lr']:g}"] if result.get("hyperp_lr") else []
    fig.suptitle(
        f"Coordinate check: layer output size vs width, {', '.join(lrs)}, "
        f"{result['seeds']} seeds, head dim {result['head_dim']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
