"""Token-horizon check: how does the best learning rate move with the number of training tokens T?

For a fixed model this module trains an lr grid at several horizons (``train.steps``; T = steps ·
tokens per step; :mod:`mupfast.checks.scale_grid`), finds the optimum at each horizon (a parabola in
log2 lr near the best grid point) and fits

    log2 η*(T) = c − α · log2 T

weighted by each optimum's bootstrap σ over seeds (:mod:`mupfast.checks.optimum_fit`), to report α
with its uncertainty next to 0.32 (HyperP's exponent, which mupfast's AdamW rule takes by default).
``--grid weight_decay`` grids the weight decay at a fixed lr instead: AdamW's timescale rule says
its optimum falls as 1/T there. How the runs are set up and how σ is found: docs/hyperp.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mupfast.checks.optimum_fit import exponent_fit, fit_slope, parabola_optimum, weighted_line  # noqa: F401
from mupfast.checks.optimum_plot import plot_optimum, summary_lines
from mupfast.checks.results import write_result_files
from mupfast.checks.scale_grid import ScaleGrid, check_grid, grid_record, run_grid
from mupfast.config import Config, load_config, with_overrides
from mupfast.flags import parse_int_list, parse_lr, parse_lrs, parse_positive_int

#: HyperP's token-horizon exponent, as a positive α in η* ∝ T^-α.
REFERENCE_ALPHA = 0.32
#: At a fixed lr and batch the timescale rule keeps η·λ·S constant: λ* ∝ 1/S ∝ T^-1.
TIMESCALE_EXPONENT = 1.0


# ----------------------------------------------------------------------------------------------
# Fitting (pure functions, tested on synthetic curves with a known exponent)


def fit_horizon(
    losses: Any,
    log2_lrs: Sequence[float],
    log2_tokens: Sequence[float],
    *,
    n_boot: int = 2000,
    window: int = 2,
    min_sigma: float = 0.05,
    seed: int = 0,
    reference: float = REFERENCE_ALPHA,
) -> dict[str, Any]:
    """α of log2 v* = c − α·log2 T from val losses ``losses[horizon][grid value][seed]`` (inf:
    diverged); v is the lr (or, gridded instead, the weight decay). :func:`fit_slope`'s report read
    as an exponent (``alpha``), with ``z`` = (α − reference)/σ."""
    fit = fit_slope(
        losses,
        log2_lrs,
        log2_tokens,
        n_boot=n_boot,
        window=window,
        min_sigma=min_sigma,
        seed=seed,
        what="horizon fit",
        scales="horizons",
    )
    return {
        "log2_tokens": fit["log2_axis"],
        **exponent_fit(fit, sign=-1.0, reference=reference, name="alpha"),
    }


# ----------------------------------------------------------------------------------------------
# The runs


def horizon_config(cfg: Config, steps: int) -> Config:
    """``cfg`` trained for ``steps``, the warmup the same fraction of training."""
    t, sch = cfg.train, cfg.schedule
    values = {"train.steps": steps, "schedule.warmup_steps": round(sch.warmup_steps * steps / t.steps)}
    return with_overrides(cfg, values)


def horizon_test(
    cfg: Config,
    *,
    horizons: Sequence[int],
    lrs: Sequence[float],
    seeds: int = 3,
    parametrization: str = "hyperp",
    grid: str = "lr",
    fixed_lr: float | None = None,
    out: str | Path = "runs/horizon-test",
    jobs: int = 1,
    progress: bool = True,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Run (or finish) the grid and fit α; returns the dict ``horizon-test`` writes as JSON.

    ``lrs`` are the grid's values: lrs, or with ``grid="weight_decay"`` weight decays at the lr
    ``fixed_lr`` (default the config's), whose optimum the timescale rule says falls as 1/T."""
    from mupfast.data import prepare_sources

    g = ScaleGrid("steps", sorted(horizons), grid, list(lrs), seeds, parametrization)
    check_grid(g, "--steps", "horizons")
    prepare_sources(cfg.data, progress=progress)
    t0 = time.perf_counter()
    losses = run_grid(
        g,
        lambda steps: horizon_config(cfg, steps),
        out=Path(out),
        fixed_lr=fixed_lr,
        jobs=jobs,
        progress=progress,
        desc="horizon-test",
    )
    batch = cfg.train.tokens_per_step()
    tokens = [h * batch for h in g.scales]
    reference = REFERENCE_ALPHA if grid == "lr" else TIMESCALE_EXPONENT
    log2_values = [math.log2(v) for v in g.values]
    fit = fit_horizon(losses, log2_values, [math.log2(x) for x in tokens], n_boot=n_boot, reference=reference)
    record = grid_record(g, cfg, losses)
    return {
        "check": "horizon-test",
        **record,
        "horizons_steps": list(g.scales),
        "tokens": tokens,
        "tokens_per_step": batch,
        "fixed_lr": None if grid == "lr" else (fixed_lr if fixed_lr is not None else cfg.optim.lr),
        **({"lrs": list(g.values), "log2_lrs": log2_values} if grid == "lr" else {}),
        "fit": fit,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }


# ----------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict, out: str | Path, name: str = "horizon_test") -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` into ``out``; return their paths."""
    return write_result_files(result, out, name, plot_optimum)


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default="100,200,400,800", help="horizons in steps (default %(default)s)")
    parser.add_argument(
        "--lrs",
        default="2^-6,2^-5.5,2^-5,2^-4.5,2^-4,2^-3.5,2^-3",
        help="lr grid; under hyperp η0 = η (default %(default)s)",
    )
    parser.add_argument(
        "--grid",
        default="lr",
        help="what is gridded at each horizon: lr, or weight_decay at a fixed lr (default %(default)s)",
    )
    parser.add_argument(
        "--wds",
        default="2^-4,2^-3,2^-2,2^-1,2^0,2^1,2^2",
        help="with --grid weight_decay: the weight-decay grid (default %(default)s)",
    )
    parser.add_argument("--lr", default=None, help="with --grid weight_decay: the lr (default the config's)")
    parser.add_argument("--seeds", default="3", help="seeds per point (default %(default)s)")
    parser.add_argument("--parametrization", default="hyperp", help="default %(default)s")
    parser.add_argument(
        "--bootstrap", default="2000", help="bootstrap replicates over seeds (default %(default)s)"
    )
    parser.add_argument("--jobs", default="1", help="parallel runs (default %(default)s)")
    parser.add_argument("--out", default="runs/horizon-test", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The ``horizon-test`` verb: train the grid, fit α, print it, write the JSON and the picture."""
    result = horizon_test(
        load_config(args.config, args.overrides),
        horizons=parse_int_list(args.steps, "--steps"),
        lrs=parse_lrs(args.wds, "--wds") if args.grid == "weight_decay" else parse_lrs(args.lrs),
        seeds=parse_positive_int(args.seeds, "--seeds"),
        parametrization=args.parametrization,
        grid=args.grid,
        fixed_lr=None if args.lr is None else parse_lr(args.lr, "--lr"),
        out=args.out,
        jobs=parse_positive_int(args.jobs, "--jobs"),
        n_boot=parse_positive_int(args.bootstrap, "--bootstrap"),
    )
    js, png = write_outputs(result, args.out)
    print("\n".join(summary_lines(result)))
    print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
    return 0
