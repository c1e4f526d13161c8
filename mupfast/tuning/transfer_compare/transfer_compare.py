"""``mupfast transfer-compare``: does μTransfer pay? The recipe against SP tuned at the target.

One command runs three ways of getting a target model's hyperparameters and prices each in FLOPs:

- **μTransfer** (the Cerebras recipe): a ``mupfast sweep`` study on the proxy (its storage, space and
  trials: :func:`mupfast.tuning.sweep.sweep.sweep`), the top k stable trials as ``mupfast transfer``
  selects them, carried to the target by :func:`~mupfast.tuning.transfer.values.transferred_values`
  and trained there (the validation step, path (a)); its best is the lowest of those.
  Tuning cost: every proxy trial's trained tokens + the validation runs. With ``--proxy-reseeds R``
  the best 2k stable trials first train at R more seeds on the proxy and the top k by their mean
  transfer (:func:`reseed_candidates`; those runs are proxy cost too).
- **SP tuned at the target** (path (c)): the same target in SP, its lr (and optionally init std)
  on a grid, every point a target-sized run. Tuning cost: the grid. The grid must hold at least
  as many target configurations as μP's target runs (a) + (d), so SP is never out-budgeted.
- **μP with the target config's hand-set values** (path (b)): no tuning at all.

and one measurement of transfer quality (path (d)): μP's lr tuned directly at the target, on a grid
of the best transferred config's lr × 2^k (its other values kept); the transferred lr's loss over
the grid's best is the "within x %" number. (d) prices what tuning at the target would have cost
on top, but is not part of μTransfer's tuning cost (the recipe stops at (a)).

Every target run is a :class:`~mupfast.tuning.launch.Point` trained by ``run_points`` under
``<out>/runs/`` (parallel, finished runs reused); the study lives in ``<out>/proxy.db`` with its trials
under ``<out>/proxy/`` and is continued, not restarted, on a rerun. FLOPs are
:func:`mupfast.model.flops.flops_per_token` × tokens trained: a target run its full ``steps × tokens per step``
(also one that diverged: the budget was spent on it); a proxy trial the steps it trained
(:func:`trial_steps`: a pruned trial stops early, which is what the pruner buys). Evaluation
tokens are not counted on either side. The result (JSON, markdown table, picture) is written by
:mod:`mupfast.tuning.transfer_compare.plot` through ``write_result_files``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mupfast.checks.scaling import scaled_config
from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_float_list, parse_lrs, parse_positive_int
from mupfast.model.flops import flops_per_token
from mupfast.tuning.launch import (
    default_jobs,
    gpu_count,
    run_points,
)
from mupfast.tuning.transfer_compare.result import MAX_FLOPS_RATIO, MAX_TRANSFER_GAP_PCT, best_entry, derive
from mupfast.tuning.transfer_compare.runs import (
    run_entry,
    run_flops,
    seed_points,
    seed_stats,
    sp_key,
    sp_points,
)

NAME = "transfer_compare"
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PROXY, DEFAULT_TARGET = "configs/proxy-cpu.yaml", "configs/target-cpu.yaml"
DEFAULT_SP_LRS = ",".join(f"2^{e}" for e in range(-12, -3))  # 2^-12 … 2^-4 in octaves
DEFAULT_MUP_LR_GRID = "-1,-0.5,0,0.5,1"  # exponents k of the transferred lr × 2^k
#: With --proxy-reseeds, this many × --top of the best stable trials are trained at more seeds.
RESEED_POOL = 2
#: Set by the command's own flags; as dotted overrides they would be silently replaced.
FLAG_KEYS = {
    "train.steps": "--proxy-steps / --target-steps",
    "model.hidden_size": "--proxy-width / --target-width",
    "model.num_heads": "--proxy-width / --target-width (heads follow the width)",
    "model.filter_size": "--proxy-width / --target-width (the filter ratio is kept)",
}


def _config_path(path: str | None, default: str) -> Path:
    """The given config, or the default one (from the checkout when run elsewhere)."""
    if path:
        return Path(path)
    return Path(default) if Path(default).is_file() else REPO_CONFIGS / Path(default).name


def _scaled(cfg: Config, width: int | None, parametrization: str, flag: str) -> Config:
    """``cfg`` at ``width`` (heads and filter as the transfer test scales them), its μP base kept."""
    if width is None:
        return with_overrides(cfg, {"model.parametrization": parametrization})
    try:
        return scaled_config(
            cfg,
            parametrization=parametrization,
            width=width,
            base_width=cfg.model.mup_base_hidden_size or width,
        )
    except ConfigError as e:
        raise ConfigError(str(e).replace("--widths", flag)) from None


def build_configs(
    proxy_path: str | Path,
    target_path: str | Path,
    overrides: Sequence[str],
    *,
    proxy_width: int | None,
    target_width: int | None,
    proxy_steps: int,
    target_steps: int | None,
) -> tuple[Config, Config, Config]:
    """(proxy, μP target, SP target): the overrides applied to both, each at its width and steps."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in FLAG_KEYS:
            raise ConfigError(f"{key}: set by {FLAG_KEYS[key]} in transfer-compare, not as an override")
    proxy = load_config(proxy_path, overrides)
    target = load_config(target_path, overrides)
    for cfg, what in ((proxy, "--config (the proxy)"), (target, "--target")):
        if cfg.model.parametrization not in ("mup", "completep"):
            raise ConfigError(
                f"{what}: model.parametrization is {cfg.model.parametrization}; transfer-compare "
                "compares a mup or completep proxy and target against SP"
            )
    proxy = with_overrides(
        _scaled(proxy, proxy_width, proxy.model.parametrization, "--proxy-width"),
        {"train.steps": proxy_steps},
    )
    t_width = target_width or target.model.hidden_size
    if t_width < proxy.model.hidden_size:
        raise ConfigError(
            f"--target-width: {t_width} is narrower than the proxy ({proxy.model.hidden_size}); "
            "μTransfer goes from a small proxy to a wider target"
        )
    steps = {"train.steps": target_steps or proxy_steps}
    mup = with_overrides(_scaled(target, target_width, target.model.parametrization, "--target-width"), steps)
    sp = with_overrides(_scaled(target, target_width, "sp", "--target-width"), steps)
    return proxy, mup, sp


def parse_mup_lr_grid(text: str) -> list[float]:
    """Exponents k of the μP target grid (lr × 2^k), with 0 (the transferred lr itself) always in."""
    ks = sorted(set(parse_float_list(text, "--mup-lr-grid", positive=False)) | {0.0})
    if len(ks) < 2:
        raise ConfigError(
            f"--mup-lr-grid: needs an exponent besides 0, e.g. --mup-lr-grid={DEFAULT_MUP_LR_GRID}"
        )
    return ks


# ----------------------------------------------------------------------------------------------
# Compute


def trial_steps(trial, steps: int) -> int:
    """Optimizer steps a proxy trial trained: all of them if it completed; otherwise the last step
    its metrics.jsonl records (what a pruned or failed trial ran before it was stopped), at least
    the step of its last reported val loss."""
    if trial.state.name == "COMPLETE":
        return steps
    from mupfast.rundir import read_metrics

    seen = [max(trial.intermediate_values)] if trial.intermediate_values else []
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir:
        try:
            seen += [int(r["step"]) for r in read_metrics(run_dir, "train")]
        except (ValueError, KeyError, TypeError):  # a torn metrics file: what the storage says
            pass
    return min(max(seen, default=0), steps)


# ----------------------------------------------------------------------------------------------
# The proxy study (several workers: one in this process, the others spawned)


def _sweep_worker(proxy: Config, kwargs: dict, log: str) -> None:
    from mupfast.tuning.sweep.sweep import sweep

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)  # its trial lines go to a log; this terminal keeps the main worker's bar
    os.dup2(fd, 2)
    sweep(proxy, **kwargs)


def run_proxy_study(proxy: Config, *, jobs: int, study: str, storage: str, sweep_dir: Path, **kwargs):
    """Fill the study to its trial budget with ``jobs`` workers; return it (loaded from storage)."""
    import multiprocessing as mp

    import optuna

    from mupfast.tuning.storage import open_storage
    from mupfast.tuning.sweep.sweep import _started, study_counts, sweep

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Created here first, so the spawned workers do not race to create the same study.
    existing = optuna.create_study(
        study_name=study, storage=open_storage(storage), direction="minimize", load_if_exists=True
    )
    common = dict(study_name=study, storage=storage, sweep_dir=sweep_dir, **kwargs)
    common["threads"] = max(1, (os.cpu_count() or 1) // jobs)
    n_gpus = gpu_count()
    procs = []
    if jobs > 1 and _started(study_counts(existing)) < kwargs["n_trials"]:
        ctx = mp.get_context("spawn")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, jobs):
            w = {**common, "progress": False, "gpus": str(i % n_gpus) if n_gpus else None}
            log = str(sweep_dir / f"worker{i}.log")
            p = ctx.Process(target=_sweep_worker, args=(proxy, w, log), daemon=False)
            p.start()
            procs.append(p)
    try:
        st = sweep(proxy, gpus="0" if n_gpus and jobs > 1 else None, **common)
        for p in procs:  # they finish the trials they hold
            p.join()
    finally:
        for p in procs:  # interrupted: SIGTERM stops each worker's trial (marked FAIL), then it exits
            if p.is_alive():
                p.terminate()
                p.join()
    for i, p in enumerate(procs, 1):
        if p.exitcode:
            print(
                f"note: proxy worker {i} exited with {p.exitcode} (see {sweep_dir}/worker{i}.log)",
                file=sys.stderr,
            )
    return st


def reseed_candidates(
    proxy: Config, pool: list, *, top: int, reseeds: int, out_dir: Path, jobs: int, progress: bool
) -> tuple[list, list[dict[str, Any]], float]:
    """Train each of ``pool``'s proxy trials again at ``reseeds`` more seeds (offsets 1…reseeds of
    the proxy's seed; the trial itself is offset 0) and rank them by the mean over all seeds.

    A single proxy run ranks partly on seed noise where the loss curve has a plateau whose end
    varies by seed (docs/mutransfer.md); the mean ranks on the configuration. Returns the top
    ``top`` rows by mean (a diverged seed sinks its trial), a record per pool trial, and the FLOPs
    of the extra runs (every one trained all its steps).
    """
    from mupfast.tuning.trial import trial_config

    points = {}
    for row in pool:
        run_dir = out_dir / f"trial-{row.number:04d}"
        cfg = trial_config(proxy, row.params, run_dir)
        points[row.number] = seed_points(cfg, run_dir, reseeds, "proxy", cfg.optim.lr, first=1)
    flat = [pt for pts in points.values() for pt in pts]
    values = run_points(flat, jobs=jobs, progress=progress, desc="transfer-compare proxy re-seeds")
    records = [
        {"trial": row.number, **seed_stats([row.value] + [values[pt.run_dir] for pt in points[row.number]])}
        for row in pool
    ]
    order = sorted(range(len(pool)), key=lambda i: records[i]["val_loss"])
    chosen = [pool[i] for i in order if math.isfinite(records[i]["val_loss"])][:top]
    return chosen, records, sum(run_flops(pt.cfg) for pt in flat)


def transfer_compare(
    proxy: Config,
    target: Config,
    sp_target: Config,
    *,
    out: str | Path,
    trials: int,
    top: int,
    seeds: int,
    sp_lrs: Sequence[float],
    sp_init_stds: Sequence[float] | None,
    mup_lr_grid: Sequence[float],
    jobs: int,
    space=None,
    study: str = "transfer-compare",
    storage: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    proxy_reseeds: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) all of it; return the result dict that the verb writes."""
    from mupfast.data import prepare_sources
    from mupfast.tuning.space import load_space
    from mupfast.tuning.stability import DEFAULT_THRESHOLDS
    from mupfast.tuning.sweep.report import collect, rank
    from mupfast.tuning.transfer.values import transferred_values

    out = Path(out)
    sp_init_stds = list(sp_init_stds or [sp_target.model.init_std])
    ks = sorted(set(mup_lr_grid) | {0.0})
    n_mup, n_sp = top + len(ks) - 1, len(sp_lrs) * len(sp_init_stds)
    if n_sp < n_mup:  # checked before anything trains
        raise ConfigError(
            f"--sp-lrs: SP gets {n_sp} target configs, fewer than μP's {n_mup} ({top} transferred + "
            f"{len(ks) - 1} more lrs of --mup-lr-grid); widen --sp-lrs or --sp-init-stds"
        )
    storage = storage or f"sqlite:///{out.resolve() / 'proxy.db'}"
    for data in {repr(c.data): c.data for c in (proxy, target)}.values():
        prepare_sources(data, progress=progress)  # once, before any worker starts

    t0 = time.perf_counter()
    st = run_proxy_study(
        proxy,
        jobs=jobs,
        study=study,
        storage=storage,
        sweep_dir=(out / "proxy").resolve(),
        n_trials=trials,
        space=space if space is not None else load_space(None, proxy),
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        progress=progress and sys.stderr.isatty(),
        top=top,
    )
    sweep_s = time.perf_counter() - t0
    rows = collect(st, DEFAULT_THRESHOLDS)
    chosen, flagged = rank(rows, top)
    reseeded, reseed_flops = [], 0.0
    if proxy_reseeds and chosen:
        chosen, reseeded, reseed_flops = reseed_candidates(
            proxy,
            rank(rows, RESEED_POOL * top)[0],
            top=top,
            reseeds=proxy_reseeds,
            out_dir=out / "proxy-reseeds",
            jobs=jobs,
            progress=progress,
        )
    if not chosen:
        raise ConfigError(
            f"--study {study}: no complete stable proxy trial to transfer (mupfast sweep --report)"
        )
    ranked_by = {rec["trial"]: rec["val_loss"] for rec in reseeded}  # the proxy loss that ranked a trial
    proxy_trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state.name == "COMPLETE" else None,
            "params": dict(t.params),
            "steps": trial_steps(t, proxy.train.steps),
        }
        for t in st.get_trials(deepcopy=False)
    ]
    proxy_flops = sum(run_flops(proxy, t["steps"]) for t in proxy_trials) + reseed_flops

    # Phase 1: (a) the transferred configs, (b) μP hand-set, (c) SP's grid.
    runs = out / "runs"
    transferred = []
    for i, row in enumerate(chosen, 1):
        values = transferred_values(proxy, row.params, target)
        values.pop("hyperp", None)
        cfg = with_overrides(target, values)
        key = f"top{i}-trial{row.number:04d}"
        pts = seed_points(cfg, runs / "mutransfer" / key, seeds, "μT", cfg.optim.lr)
        transferred.append((key, row, cfg, pts))
    hand = seed_points(target, runs / "mup-hand-set", seeds, "mup", target.optim.lr)
    sp_grid = [(std, lr) for std in sp_init_stds for lr in sp_lrs]
    sp_groups = [sp_points(sp_target, std, lr, runs / "sp", seeds) for std, lr in sp_grid]
    t1 = time.perf_counter()
    phase1 = [pt for _, _, _, pts in transferred for pt in pts] + hand + [pt for g in sp_groups for pt in g]
    values = run_points(phase1, jobs=jobs, progress=progress, desc="transfer-compare (a)-(c)")
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
    # Phase 2: (d) μP's lr at the target, around the best transferred config (top 1 if none is finite).
    center = best_entry(mut_entries) or mut_entries[0]
    c_key, _, c_cfg, c_pts = next(t for t in transferred if t[0] == center["key"])
    grid_pts = {0.0: c_pts}  # × 2^0 is the transferred run itself: reused, not trained again
    for k in ks:
        if k:
            cfg = with_overrides(c_cfg, {"optim.lr": c_cfg.optim.lr * 2.0**k})
            grid_pts[k] = seed_points(
                cfg, runs / "mup-lr-grid" / c_key / f"x2^{k:g}", seeds, "mup", cfg.optim.lr
            )
    values.update(
        run_points(
            [pt for k in ks if k for pt in grid_pts[k]],
            jobs=jobs,
            progress=progress,
            desc="transfer-compare (d)",
        )
    )
    target_s = time.perf_counter() - t1

    sp_entries = [run_entry(g, values, key=sp_key(*point)) for point, g in zip(sp_grid, sp_groups)]
    result = {
        "proxy": {
            "width": proxy.model.hidden_size,
            "num_layers": proxy.model.num_layers,
            "steps": proxy.train.steps,
            "tokens_per_step": proxy.train.tokens_per_step(),
            "study": study,
            "storage": storage,
            "trials": proxy_trials,
            "selected": [r.number for r in chosen],
            "reseeds": proxy_reseeds,
            "reseeded": reseeded,
            "unstable_better": [r.number for r in flagged],
        },
        "target": {
            "width": target.model.hidden_size,
            "num_layers": target.model.num_layers,
            "mup_base_hidden_size": target.model.mup_base_hidden_size,
            "steps": target.train.steps,
            "tokens_per_step": target.train.tokens_per_step(),
            "seeds": seeds,
        },
        "mutransfer": {"configs": mut_entries},
        "mup_hand_set": run_entry(hand, values, key="mup-hand-set"),
        "sp": {"grid": sp_entries},
        "mup_lr_grid": {
            "center": c_key,
            "center_lr": c_cfg.optim.lr,
            "exponents": ks,
            "grid": [run_entry(grid_pts[k], values, exponent=k) for k in ks],
        },
        "flops": {
            "proxy_flops_per_token": flops_per_token(proxy.model, proxy.train.seq_len),
            "target_flops_per_token": flops_per_token(target.model, target.train.seq_len),
            "proxy_trials": len(proxy_trials),
            "proxy_steps_trained": sum(t["steps"] for t in proxy_trials),
            "proxy_reseeds": reseed_flops,
            "proxy": proxy_flops,
        },
        "targets": {"max_flops_ratio": MAX_FLOPS_RATIO, "max_transfer_gap_pct": MAX_TRANSFER_GAP_PCT},
        "elapsed_s": {"proxy": round(sweep_s, 1), "target": round(target_s, 1)},
        "jobs": jobs,
        "proxy_config": proxy.to_dict(),
        "target_config": target.to_dict(),
    }
    return derive(result)


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


def _optional_int(text: str | None, flag: str) -> int | None:
    return None if text is None else parse_positive_int(text, flag)


def run(args: argparse.Namespace) -> int:
    """The verb: check every flag, run what is not done yet, write JSON, markdown and picture."""
    from mupfast.tuning.space import load_space
    from mupfast.tuning.sweep.sweep import make_pruner, make_sampler

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
    trials, top = parse_positive_int(args.trials, "--trials"), parse_positive_int(args.top, "--top")
    if top > trials:
        raise ConfigError(f"--top: {top} is more than --trials {trials}")
    reseeds = parse_positive_int(args.proxy_reseeds, "--proxy-reseeds", zero_ok=True)
    try:
        seed = int(args.seed)
    except ValueError:
        raise ConfigError(f"--seed: {args.seed!r} is not an integer") from None
    make_sampler(args.sampler, seed)  # a bad name is an error now, not after the configs load
    make_pruner(args.pruner)
    proxy, target, sp = build_configs(
        _config_path(args.config, DEFAULT_PROXY),
        _config_path(args.target, DEFAULT_TARGET),
        args.overrides,
        proxy_width=_optional_int(args.proxy_width, "--proxy-width"),
        target_width=_optional_int(args.target_width, "--target-width"),
        proxy_steps=parse_positive_int(args.proxy_steps, "--proxy-steps"),
        target_steps=_optional_int(args.target_steps, "--target-steps"),
    )
    result = transfer_compare(
        proxy,
        target,
        sp,
        out=args.out,
        trials=trials,
        top=top,
        seeds=parse_positive_int(args.seeds, "--seeds"),
        sp_lrs=parse_lrs(args.sp_lrs or DEFAULT_SP_LRS, "--sp-lrs"),
        sp_init_stds=sp_init_stds,
        mup_lr_grid=parse_mup_lr_grid(args.mup_lr_grid),
        jobs=jobs,
        space=load_space(args.space, proxy),
        study=args.study,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=seed,
        proxy_reseeds=reseeds,
    )
    return _write(result, args.out)


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
