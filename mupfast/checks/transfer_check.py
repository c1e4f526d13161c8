"""μTransfer test: does the best learning rate stay put as the model gets wider (or deeper)?

For each parametrization × width (or depth) × lr × seed, one real training run through the trainer
(``mupfast.train.train``: DeepSpeed engine, the embedded corpus, a run directory with
``metrics.jsonl`` and ``summary.json``); the point's value is the final validation loss. Per width
the optimum is the lr with the lowest val loss (mean over seeds); the *drift* is how far the optimum
moves across widths, in grid steps (max − min of its index on the lr grid). With a factor-2 grid,
μP should keep the drift ≤ 1 while SP's optimum moves to smaller lrs as the width grows (Tensor
Programs V, Figure 1). A quadratic fitted in log2 lr through the optimum and its two neighbours
gives a sub-grid estimate, reported beside the grid optimum.

Width scaling is the coordinate check's (:func:`mupfast.checks.scaling.scaled_config`): the head dim
and filter ratio stay fixed and ``mup_base_hidden_size`` is the smallest width. The depth variant
sweeps ``num_layers`` at the config's width with ``mup_base_num_layers`` the smallest depth
(typically ``mup`` against ``completep``).

HyperP (``hyperp``) has one lr from its transfer rule, so its grid (``hyperp_lrs``) is over the
base η0, with the smallest model's own batch, depth and horizon as the base values (docs/hyperp.md).
The table and the picture are in :mod:`mupfast.checks.transfer_plot`.

Runs go to ``<out>/runs/<parametrization>/<axis><size>/lr<lr>/seed<s>`` and are trained by
:mod:`mupfast.tuning.launch` (finished runs reused, diverged ones counted as +inf and drawn as such).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mupfast.checks.results import write_result_files
from mupfast.checks.scaling import scaled_config
from mupfast.checks.transfer_plot import plot_transfer, table_lines
from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_int_list, parse_lrs, parse_parametrizations, parse_positive_int
from mupfast.parametrization import hyperp_own_bases
from mupfast.tuning.launch import (
    Point,
    default_jobs,
    grid_run_dir,
    grid_run_overrides,
    mean_loss,
    run_points,
)


def lr_grids(parametrizations: Sequence[str], lrs: Sequence[float], hyperp_lrs: Sequence[float] | None):
    """Parametrization → its lr grid: ``lrs`` for all, or ``hyperp_lrs`` (grid of η0) for hyperp."""
    return {p: list(hyperp_lrs if p == "hyperp" and hyperp_lrs else lrs) for p in parametrizations}


# ----------------------------------------------------------------------------------------------
# Optimum finding (pure functions, tested on known curves)


def quadratic_vertex(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """x of the vertex of the parabola through three points, or None if it does not open upwards."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
    if not a > 0:
        return None
    return -b / (2 * a)


def find_optimum(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """The best lr of one curve: grid index, lr, log2 lr, and a quadratic sub-grid estimate.

    ``losses`` may hold inf/nan (diverged runs; never the optimum). ``fit_log2_lr`` is the vertex of
    the parabola in log2 lr through the optimum and its neighbours, clamped to their span, or the
    grid value when the optimum is at an edge of the grid (``at_edge``: the true optimum may lie
    outside it) or a neighbour diverged.
    """
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        return {
            "index": None,
            "lr": None,
            "log2_lr": None,
            "fit_log2_lr": None,
            "loss": None,
            "at_edge": False,
        }
    i = min(finite, key=lambda k: (losses[k], k))
    x = [math.log2(lr) for lr in lrs]
    fit = x[i]
    at_edge = i in (0, len(lrs) - 1)
    if not at_edge and math.isfinite(losses[i - 1]) and math.isfinite(losses[i + 1]):
        v = quadratic_vertex(x[i - 1 : i + 2], losses[i - 1 : i + 2])
        if v is not None:
            fit = min(max(v, x[i - 1]), x[i + 1])
    return {
        "index": i,
        "lr": lrs[i],
        "log2_lr": x[i],
        "fit_log2_lr": fit,
        "loss": losses[i],
        "at_edge": at_edge,
    }


def drift(optima: Sequence[dict]) -> dict[str, Any]:
    """How far the optimum moves across sizes: grid steps (max − min index) and log2 units of the fit."""
    idx = [o["index"] for o in optima]
    if any(i is None for i in idx):
        return {"grid_steps": None, "fit_log2": None, "indices": idx}
    fits = [o["fit_log2_lr"] for o in optima]
    return {"grid_steps": max(idx) - min(idx), "fit_log2": max(fits) - min(fits), "indices": idx}


def make_points(
    cfg: Config,
    *,
    axis: str,
    sizes: Sequence[int],
    lrs: Sequence[float] | dict[str, Sequence[float]],
    seeds: int,
    parametrizations: Sequence[str],
    steps: int,
    out: Path,
) -> list[Point]:
    """Every (parametrization, size, lr, seed) run; ``lrs`` is one grid or a grid per parametrization.

    Under hyperp the lr of a point is the base η0 (``optim.hyperp_base_lr``) with the base values of
    :func:`~mupfast.parametrization.hyperp_own_bases` of the smallest model; ``optim.lr`` is set too
    but unused there.
    """
    grids = lrs if isinstance(lrs, dict) else {p: lrs for p in parametrizations}
    base_depth = min(sizes) if axis == "depth" else None  # hyperp's d0: the smallest model's depth
    points = []
    for p in parametrizations:
        for size in sizes:
            if axis == "width":
                scaled = scaled_config(cfg, parametrization=p, width=size, base_width=min(sizes))
            else:
                scaled = scaled_config(cfg, parametrization=p, depth=size, base_depth=min(sizes))
            for lr in grids[p]:
                for s in range(seeds):
                    run_dir = grid_run_dir(out, p, axis, size, lr, s)
                    point_cfg = with_overrides(
                        scaled,
                        {
                            "optim.lr": lr,
                            **(
                                hyperp_own_bases(cfg, lr, steps=steps, depth=base_depth)
                                if p == "hyperp"
                                else {}
                            ),
                            "train.steps": steps,
                            **grid_run_overrides(cfg.train.seed + s, run_dir),
                        },
                    )
                    points.append(Point(p, size, lr, s, str(run_dir), point_cfg))
    return points


# ----------------------------------------------------------------------------------------------
# The whole test


def summarize(
    points: list[Point],
    values: dict[str, float],
    *,
    axis: str,
    sizes: Sequence[int],
    lrs: Sequence[float] | dict[str, Sequence[float]],
) -> dict[str, Any]:
    """Per parametrization and size: the val-loss curve over its lrs, its optimum; and the drift."""
    params = list(dict.fromkeys(pt.parametrization for pt in points))
    grids = lrs if isinstance(lrs, dict) else {p: lrs for p in params}
    by_key: dict[tuple, list[float]] = {}
    for pt in points:
        by_key.setdefault((pt.parametrization, pt.size, pt.lr), []).append(values[pt.run_dir])
    result: dict[str, Any] = {}
    for p in params:
        curves, lrs = {}, grids[p]
        for size in sizes:
            per_seed = [by_key[p, size, lr] for lr in lrs]
            losses = [mean_loss(v) for v in per_seed]
            curves[str(size)] = {
                "val_loss": losses,
                "val_loss_per_seed": per_seed,
                "optimum": find_optimum(lrs, losses),
            }
        result[p] = {
            "lrs": list(lrs),
            "log2_lrs": [math.log2(lr) for lr in lrs],
            "lr_is": "optim.hyperp_base_lr (η0)" if p == "hyperp" else "optim.lr",
            "curves": curves,
            "drift": drift([curves[str(s)]["optimum"] for s in sizes]),
        }
    return result


def default_parametrizations(axis: str) -> list[str]:
    """SP against μP across widths; μP against CompleteP across depths (hyperp on request)."""
    return ["sp", "mup"] if axis == "width" else ["mup", "completep"]


def transfer_test(
    cfg: Config,
    *,
    lrs: Sequence[float],
    hyperp_lrs: Sequence[float] | None = None,
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    steps: int | None = None,
    seeds: int = 1,
    parametrizations: Sequence[str] | None = None,
    out: str | Path = "runs/transfer-test",
    jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or finish) the sweep and return the result dict that ``transfer-test`` writes as JSON.

    ``hyperp_lrs``: the grid of η0 for hyperp (its lrs sit higher than AdamW's); default ``lrs``.
    """
    from mupfast.data import prepare_sources

    if (widths is None) == (depths is None):
        raise ConfigError("transfer-test: give either --widths or --depths")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be positive (got {seeds})")
    axis = "width" if widths is not None else "depth"
    sizes = sorted(widths if widths is not None else depths)
    if parametrizations is None:
        parametrizations = default_parametrizations(axis)
    steps = steps or cfg.train.steps
    if steps < 1:
        raise ConfigError(f"--steps: must be positive (got {steps})")
    out = Path(out)
    points = make_points(
        cfg,
        axis=axis,
        sizes=sizes,
        lrs=lr_grids(parametrizations, lrs, hyperp_lrs),
        seeds=seeds,
        parametrizations=parametrizations,
        steps=steps,
        out=out,
    )
    prepare_sources(cfg.data, progress=progress)  # once, before the workers start
    t0 = time.perf_counter()
    values = run_points(points, jobs=jobs, progress=progress)
    t = points[0].cfg.train
    return {
        "axis": axis,
        "sizes": sizes,
        "lrs": list(lrs),
        "log2_lrs": [math.log2(lr) for lr in lrs],
        "hyperp_lrs": list(hyperp_lrs) if hyperp_lrs and "hyperp" in parametrizations else None,
        "steps": steps,
        "seeds": seeds,
        "tokens_per_step": t.tokens_per_step(),
        "parametrizations": list(parametrizations),
        "fixed": {
            "width": cfg.model.hidden_size if axis == "depth" else None,
            "num_layers": cfg.model.num_layers if axis == "width" else None,
            "head_dim": cfg.model.head_dim,
            "base_size": sizes[0],
        },
        "results": summarize(
            points, values, axis=axis, sizes=sizes, lrs=lr_grids(parametrizations, lrs, hyperp_lrs)
        ),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
        "base_config": cfg.to_dict(),  # what the grid scaled from, overrides included
    }


# ----------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict, out: str | Path, name: str = "transfer_test") -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` into ``out``; return their paths."""
    return write_result_files(result, out, name, plot_transfer)


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", help="comma-separated widths (default 64,128,256,512 unless --depths)")
    parser.add_argument(
        "--depths", help="comma-separated num_layers: the depth variant at the config's width"
    )
    parser.add_argument(
        "--lrs", default="2^-11,2^-10,2^-9,2^-8,2^-7,2^-6,2^-5", help="lr grid (default %(default)s)"
    )
    parser.add_argument(
        "--hyperp-lrs", help="hyperp's grid of base lrs η0 (default: --lrs); η = η0 at the smallest size"
    )
    parser.add_argument("--steps", default=None, help="steps per run (default: the config's train.steps)")
    parser.add_argument("--seeds", default="1", help="seeds per point, averaged (default %(default)s)")
    parser.add_argument(
        "--parametrizations",
        help="sp, mup, completep, hyperp; default sp,mup (widths) or mup,completep (depths)",
    )
    parser.add_argument("--jobs", default=None, help="parallel runs (default: one per GPU, else up to 2)")
    parser.add_argument("--out", default="runs/transfer-test", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The ``transfer-test`` verb: train the grid, print the optima, write the JSON and the picture."""
    if args.widths and args.depths:
        raise ConfigError("transfer-test: give --widths or --depths, not both")
    cfg = load_config(args.config, args.overrides)
    widths = depths = None
    if args.depths:
        depths = parse_int_list(args.depths, "--depths")
    else:
        widths = parse_int_list(args.widths or "64,128,256,512", "--widths")
    result = transfer_test(
        cfg,
        lrs=parse_lrs(args.lrs),
        hyperp_lrs=parse_lrs(args.hyperp_lrs, "--hyperp-lrs") if args.hyperp_lrs else None,
        widths=widths,
        depths=depths,
        steps=parse_positive_int(args.steps, "--steps") if args.steps else None,
        seeds=parse_positive_int(args.seeds, "--seeds"),
        parametrizations=parse_parametrizations(args.parametrizations) if args.parametrizations else None,
        out=args.out,
        jobs=parse_positive_int(args.jobs, "--jobs") if args.jobs else default_jobs(),
    )
    js, png = write_outputs(result, args.out)
    print("\n".join(table_lines(result)))
    print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
    return 0
