"""Batch-size check: how does the best learning rate move with the tokens per step B, at a fixed budget?

For a fixed model and a fixed number of training tokens T, this module trains an lr grid at several
batch sizes (sequences per step; the steps are T / B, the warmup the same fraction of them, the
validation the same tokens), finds the optimum at each (a parabola in log2 lr) and fits

    log2 η*(B) = c + β · log2 B

weighted by each optimum's bootstrap σ over seeds, to report β with its uncertainty next to 0.5
(square-root scaling, which mupfast's AdamW rule takes by default: optim.batch_lr_exponent).
``mupfast transfer --batch-fit RESULT.json`` carries the fitted β to a target.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mupfast.checks.optimum_fit import exponent_fit, fit_slope
from mupfast.checks.optimum_plot import plot_optimum, summary_lines
from mupfast.checks.results import write_result_files
from mupfast.checks.scale_grid import ScaleGrid, check_grid, grid_record, run_grid
from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_int_list, parse_lrs, parse_positive_int

#: Square-root scaling of Adam's lr with the batch, below the critical batch size.
REFERENCE_BETA = 0.5


def fit_batch(
    losses: Any,
    log2_lrs: Sequence[float],
    log2_batch_tokens: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """β of log2 η* = c + β·log2 B from val losses ``losses[batch][lr][seed]`` (inf: diverged)."""
    fit = fit_slope(
        losses, log2_lrs, log2_batch_tokens, n_boot=n_boot, seed=seed, what="batch fit", scales="batch sizes"
    )
    return exponent_fit(fit, sign=1.0, reference=REFERENCE_BETA, name="beta")


def batch_config(cfg: Config, sequences: int, tokens: int) -> Config:
    """``cfg`` at ``sequences`` per step for ``tokens`` training tokens: its steps, warmup fraction and
    validation tokens kept."""
    t = cfg.train
    per_step = sequences * t.seq_len
    if tokens % per_step:
        raise ConfigError(
            f"--batches: {tokens} training tokens are not a whole number of steps of {sequences} × {t.seq_len} "
            "tokens; choose --tokens divisible by every batch's tokens per step"
        )
    steps = tokens // per_step
    eval_sequences = t.eval_batches * t.micro_batch_size
    if eval_sequences % sequences:
        raise ConfigError(
            f"--batches: {sequences} sequences do not divide the {eval_sequences} validation sequences "
            "(train.eval_batches × train.micro_batch_size) every batch size is evaluated on"
        )
    values = {
        "train.micro_batch_size": sequences,
        "train.grad_accum_steps": 1,
        "train.steps": steps,
        "train.eval_batches": eval_sequences // sequences,
        "schedule.warmup_steps": round(cfg.schedule.warmup_steps * steps / t.steps),
    }
    return with_overrides(cfg, values)


def batch_test(
    cfg: Config,
    *,
    batches: Sequence[int],
    lrs: Sequence[float],
    tokens: int | None = None,
    seeds: int = 3,
    parametrization: str = "mup",
    out: str | Path = "runs/batch-test",
    jobs: int = 1,
    progress: bool = True,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Run (or finish) the grid and fit β; returns the dict ``batch-test`` writes as JSON."""
    from mupfast.data import prepare_sources

    g = ScaleGrid("batch", sorted(batches), "lr", list(lrs), seeds, parametrization)
    check_grid(g, "--batches", "batch sizes")
    budget = tokens or cfg.train.steps * cfg.train.tokens_per_step()
    configs = {b: batch_config(cfg, b, budget) for b in g.scales}  # every bad size named before any run
    prepare_sources(cfg.data, progress=progress)
    t0 = time.perf_counter()
    losses = run_grid(
        g, configs.__getitem__, out=Path(out), fixed_lr=None, jobs=jobs, progress=progress, desc="batch-test"
    )
    batch_tokens = [configs[b].train.tokens_per_step() for b in g.scales]
    log2_lrs = [math.log2(v) for v in g.values]
    fit = fit_batch(losses, log2_lrs, [math.log2(x) for x in batch_tokens], n_boot=n_boot)
    return {
        "check": "batch-test",
        **grid_record(g, cfg, losses),
        "batches": list(g.scales),
        "batch_tokens": batch_tokens,
        "steps": [configs[b].train.steps for b in g.scales],
        "tokens": budget,
        "lrs": list(g.values),
        "log2_lrs": log2_lrs,
        "fit": fit,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="8,16,32", help="sequences per step (default %(default)s)")
    parser.add_argument(
        "--tokens", default=None, help="training tokens of every run (default: the config's steps × batch)"
    )
    parser.add_argument(
        "--lrs",
        default="2^-8,2^-7.5,2^-7,2^-6.5,2^-6,2^-5.5,2^-5,2^-4.5,2^-4",
        help="lr grid (default %(default)s)",
    )
    parser.add_argument("--seeds", default="3", help="seeds per point (default %(default)s)")
    parser.add_argument("--parametrization", default="mup", help="default %(default)s")
    parser.add_argument(
        "--bootstrap", default="2000", help="bootstrap replicates over seeds (default %(default)s)"
    )
    parser.add_argument("--jobs", default="1", help="parallel runs (default %(default)s)")
    parser.add_argument("--out", default="runs/batch-test", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The ``batch-test`` verb: train the grid, fit β, print it, write the JSON and the picture."""
    result = batch_test(
        load_config(args.config, args.overrides),
        batches=parse_int_list(args.batches, "--batches"),
        lrs=parse_lrs(args.lrs),
        tokens=None if args.tokens is None else parse_positive_int(args.tokens, "--tokens"),
        seeds=parse_positive_int(args.seeds, "--seeds"),
        parametrization=args.parametrization,
        out=args.out,
        jobs=parse_positive_int(args.jobs, "--jobs"),
        n_boot=parse_positive_int(args.bootstrap, "--bootstrap"),
    )
    js, png = write_result_files(result, args.out, "batch_test", plot_optimum)
    print("\n".join(summary_lines(result)))
    print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
    return 0
