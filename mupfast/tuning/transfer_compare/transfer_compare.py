"""``mupfast transfer-compare``: does μTransfer pay? The recipe against SP tuned at the target.

One command prices three ways of getting a target model's hyperparameters in target loss and tuning
FLOPs: (a) μTransfer, a ``mupfast sweep`` study on the proxy whose top stable trials are carried to
the target and trained there (:mod:`~mupfast.tuning.transfer_compare.proxy`); (b) μP with the target
config's hand-set values; (c) SP with its lr (and init std) tuned on a grid at the target; and it
measures transfer quality with (d), μP's lr tuned at the target around the best transferred config.
Every target run is a grid point of :func:`mupfast.tuning.launch.run_points` under ``<out>/runs/``
(finished runs reused); the result is concluded by
:func:`~mupfast.tuning.transfer_compare.result.derive`. docs/mutransfer.md describes the paths, the
FLOPs bookkeeping and the measurements.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.config import with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_float_list, parse_lrs, parse_positive_int
from mupfast.model.flops import flops_per_token
from mupfast.tuning.launch import Point, default_jobs, run_points
from mupfast.tuning.transfer_compare.proxy import RESEED_POOL, ProxySide, proxy_side
from mupfast.tuning.transfer_compare.result import MAX_FLOPS_RATIO, MAX_TRANSFER_GAP_PCT, best_entry, derive
from mupfast.tuning.transfer_compare.runs import run_entry, seed_points, sp_key, sp_points
from mupfast.tuning.transfer_compare.spec import (
    DEFAULT_MUP_LR_GRID,
    DEFAULT_PROXY,
    DEFAULT_TARGET,
    CompareSpec,
    spec_from_args,
)

NAME = "transfer_compare"


def lr_exponents(spec: CompareSpec) -> list[float]:
    """(d)'s exponents, 0 included; an error, before anything trains, if SP would get fewer target
    configs than μP's (a) + (d): SP is never out-budgeted."""
    sp_init_stds = list(spec.sp_init_stds or [spec.sp_target.model.init_std])
    ks = sorted(set(spec.mup_lr_grid) | {0.0})
    n_mup, n_sp = spec.top + len(ks) - 1, len(spec.sp_lrs) * len(sp_init_stds)
    if n_sp < n_mup:
        raise ConfigError(
            f"--sp-lrs: SP gets {n_sp} target configs, fewer than μP's {n_mup} ({spec.top} transferred + "
            f"{len(ks) - 1} more lrs of --mup-lr-grid); widen --sp-lrs or --sp-init-stds"
        )
    return ks


# ----------------------------------------------------------------------------------------------
# The target runs


@dataclass
class TargetSide:
    """Every target run's record, by path."""

    mutransfer: list[dict[str, Any]]  # (a)
    hand_set: dict[str, Any]  # (b)
    sp: list[dict[str, Any]]  # (c)
    mup_lr_grid: dict[str, Any]  # (d): its center, exponents and entries
    seconds: float


def transferred_points(spec: CompareSpec, chosen: list) -> list[tuple[str, Any, Any, list[Point]]]:
    """(a): (key, proxy trial, target config, its seeds' points) of every transferred trial."""
    from mupfast.tuning.transfer.values import transferred_values

    out = []
    for i, row in enumerate(chosen, 1):
        values = transferred_values(spec.proxy, row.params, spec.target)
        cfg = with_overrides(spec.target, values)
        key = f"top{i}-trial{row.number:04d}"
        out.append(
            (
                key,
                row,
                cfg,
                seed_points(cfg, spec.out / "runs" / "mutransfer" / key, spec.seeds, "μT", cfg.optim.lr),
            )
        )
    return out


def lr_grid_points(spec: CompareSpec, key: str, cfg, ks: list[float]) -> dict[float, list[Point]]:
    """(d): the transferred config ``cfg`` at lr × 2^k for every k but 0 (that is the run itself)."""
    grid = {}
    for k in ks:
        if k:
            at = with_overrides(cfg, {"optim.lr": cfg.optim.lr * 2.0**k})
            grid[k] = seed_points(
                at, spec.out / "runs" / "mup-lr-grid" / key / f"x2^{k:g}", spec.seeds, "mup", at.optim.lr
            )
    return grid


def target_side(spec: CompareSpec, proxy: ProxySide, ks: list[float]) -> TargetSide:
    """Train (a), (b), (c), then (d) around (a)'s best (its top 1 if none is finite)."""
    runs, seeds, jobs, progress = spec.out / "runs", spec.seeds, spec.jobs, spec.progress
    transferred = transferred_points(spec, proxy.chosen)
    hand = seed_points(spec.target, runs / "mup-hand-set", seeds, "mup", spec.target.optim.lr)
    sp_grid = [
        (std, lr) for std in (spec.sp_init_stds or [spec.sp_target.model.init_std]) for lr in spec.sp_lrs
    ]
    sp_groups = [sp_points(spec.sp_target, std, lr, runs / "sp", seeds) for std, lr in sp_grid]
    t0 = time.perf_counter()
    phase1 = [pt for *_, pts in transferred for pt in pts] + hand + [pt for g in sp_groups for pt in g]
    values = run_points(phase1, jobs=jobs, progress=progress, desc="transfer-compare (a)-(c)")
    ranked_by = {
        rec["trial"]: rec["val_loss"] for rec in proxy.reseeded
    }  # the proxy loss that ranked a trial
    mut_entries = [
        run_entry(
            pts,
            values,
            key=key,
            trial=row.number,
            proxy_val_loss=ranked_by.get(row.number, row.value),
            params=row.params,
        )
        for key, row, _, pts in transferred
    ]
    center = best_entry(mut_entries) or mut_entries[0]
    c_key, _, c_cfg, c_pts = next(t for t in transferred if t[0] == center["key"])
    grid_pts = {0.0: c_pts, **lr_grid_points(spec, c_key, c_cfg, ks)}  # × 2^0: reused, not trained again
    extra = [pt for k in ks if k for pt in grid_pts[k]]
    values.update(run_points(extra, jobs=jobs, progress=progress, desc="transfer-compare (d)"))
    return TargetSide(
        mutransfer=mut_entries,
        hand_set=run_entry(hand, values, key="mup-hand-set"),
        sp=[run_entry(g, values, key=sp_key(*point)) for point, g in zip(sp_grid, sp_groups)],
        mup_lr_grid={
            "center": c_key,
            "center_lr": c_cfg.optim.lr,
            "exponents": ks,
            "grid": [run_entry(grid_pts[k], values, exponent=k) for k in ks],
        },
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------------------------
# The study


def _sizes(spec: CompareSpec, storage: str, proxy: ProxySide) -> dict[str, Any]:
    """The result's proxy and target sections: sizes, the study, the trials and seeds."""
    p, t = spec.proxy, spec.target
    return {
        "proxy": {
            "width": p.model.hidden_size,
            "num_layers": p.model.num_layers,
            "steps": p.train.steps,
            "tokens_per_step": p.train.tokens_per_step(),
            "study": spec.study,
            "storage": storage,
            "trials": proxy.trials,
            "selected": [r.number for r in proxy.chosen],
            "reseeds": spec.proxy_reseeds,
            "reseeded": proxy.reseeded,
            "unstable_better": [r.number for r in proxy.flagged],
        },
        "target": {
            "width": t.model.hidden_size,
            "num_layers": t.model.num_layers,
            "mup_base_hidden_size": t.model.mup_base_hidden_size,
            "steps": t.train.steps,
            "tokens_per_step": t.train.tokens_per_step(),
            "seeds": spec.seeds,
        },
    }


def result_dict(spec: CompareSpec, storage: str, proxy: ProxySide, target: TargetSide) -> dict[str, Any]:
    """Everything the runs measured, before :func:`derive` concludes from it."""
    p, t = spec.proxy, spec.target
    return {
        **_sizes(spec, storage, proxy),
        "mutransfer": {"configs": target.mutransfer},
        "mup_hand_set": target.hand_set,
        "sp": {"grid": target.sp},
        "mup_lr_grid": target.mup_lr_grid,
        "flops": {
            "proxy_flops_per_token": flops_per_token(p.model, p.train.seq_len),
            "target_flops_per_token": flops_per_token(t.model, t.train.seq_len),
            "proxy_trials": len(proxy.trials),
            "proxy_steps_trained": sum(x["steps"] for x in proxy.trials),
            "proxy_reseeds": proxy.reseed_flops,
            "proxy": proxy.flops,
        },
        "targets": {"max_flops_ratio": MAX_FLOPS_RATIO, "max_transfer_gap_pct": MAX_TRANSFER_GAP_PCT},
        "elapsed_s": {"proxy": round(proxy.seconds, 1), "target": round(target.seconds, 1)},
        "jobs": spec.jobs,
        "proxy_config": p.to_dict(),
        "target_config": t.to_dict(),
    }


def transfer_compare(spec: CompareSpec) -> dict[str, Any]:
    """Run (or continue) all of it; return the result dict that the verb writes."""
    from mupfast.data import prepare_sources

    ks = lr_exponents(spec)  # checked before anything trains
    storage = spec.storage or f"sqlite:///{spec.out.resolve() / 'proxy.db'}"
    for data in {repr(c.data): c.data for c in (spec.proxy, spec.target)}.values():
        prepare_sources(data, progress=spec.progress)  # once, before any worker starts
    proxy = proxy_side(spec, storage)
    if not proxy.chosen:
        raise ConfigError(
            f"--study {spec.study}: no complete stable proxy trial to transfer (mupfast sweep --report)"
        )
    return derive(result_dict(spec, storage, proxy, target_side(spec, proxy, ks)))


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--target",
        help=f"the target model's config (default {DEFAULT_TARGET}; --config: the proxy's, {DEFAULT_PROXY})",
    )
    a("--proxy-width", help="the proxy's hidden size (default: its config's); heads and filter scale with it")
    a("--target-width", default="512", help="the target's hidden size (default %(default)s)")
    a("--proxy-steps", default="300", help="proxy training steps (default %(default)s)")
    a("--target-steps", help="target training steps (default: the proxy's)")
    a("--trials", default="48", help="proxy trials, the study's budget (default %(default)s)")
    a("--top", default="3", help="stable proxy trials transferred (default %(default)s)")
    a("--seeds", default="2", help="seeds of every target run (default %(default)s)")
    a(
        "--sp-lrs",
        help="SP's target lr grid (default 2^-12..2^-4 in octaves; with --extend, the lrs the grid has)",
    )
    a(
        "--sp-init-stds",
        help="SP's init std grid (default: the target's model.init_std; with --extend, the stds the grid has)",
    )
    a(
        "--extend",
        metavar="RESULT_JSON",
        help="widen a finished study's SP grid to --sp-lrs × --sp-init-stds: train only the points the "
        "result lacks (from the target config it recorded), keep the rest, conclude again into --out",
    )
    a(
        "--mup-lr-grid",
        default=DEFAULT_MUP_LR_GRID,
        help="μP target grid: best transferred lr × 2^k (default k = %(default)s; write --mup-lr-grid=-1,0,1)",
    )
    a("--space", help="the proxy sweep's space file (default: the built-in ranges)")
    # TPE, not random: with 48 trials in five dimensions, random search's top 3 transferred worse
    # at the d=256 target (1.754, 2.225, 1.876 against TPE's 1.725, 1.800, 1.751; docs/mutransfer.md).
    a("--sampler", default="tpe", help="tpe or random (default %(default)s)")
    a("--pruner", default="median", help="median, hyperband or none (default %(default)s)")
    a("--seed", default="0", help="the sweep's sampler seed (default %(default)s)")
    a(
        "--proxy-reseeds",
        default="0",
        help=f"train the best {RESEED_POOL}×--top stable proxy trials at this many more seeds and "
        "transfer the top by their mean (counted as proxy FLOPs; default %(default)s)",
    )
    a("--study", default="transfer-compare", help="study name (default %(default)s)")
    a("--storage", help="the study's storage (default sqlite:///<out>/proxy.db)")
    a("--jobs", help="parallel runs (default: one per GPU, else up to 2)")
    a("--out", default="runs/transfer-compare", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The verb: check every flag, run what is not done yet, write JSON, markdown and picture."""
    sp_init_stds = parse_float_list(args.sp_init_stds, "--sp-init-stds") if args.sp_init_stds else None
    jobs = parse_positive_int(args.jobs, "--jobs") if args.jobs else default_jobs()
    if args.extend:
        from mupfast.tuning.transfer_compare.extend import check_extend_flags, extend_sp_grid, load_result

        check_extend_flags(args.overrides, args.config, args.target)
        result = extend_sp_grid(
            load_result(args.extend),
            source=str(args.extend),
            out=args.out,
            sp_lrs=parse_lrs(args.sp_lrs, "--sp-lrs") if args.sp_lrs else None,
            sp_init_stds=sp_init_stds,
            jobs=jobs,
        )
        return _write(result, args.out)
    return _write(transfer_compare(spec_from_args(args, jobs, sp_init_stds)), args.out)


def _write(result: dict[str, Any], out: str) -> int:
    """The result's JSON, markdown table and picture under ``out``; the table also to stdout."""
    from mupfast.checks.results import write_result_files
    from mupfast.tuning.transfer_compare.plot import markdown, plot_compare

    js, png = write_result_files(result, out, NAME, plot_compare)
    md = Path(out, f"{NAME}.md")
    md.write_text(markdown(result) + "\n")
    print(md.read_text(), end="")
    print(f"wrote {js}, {md} and {png}")
    return 0
