"""The proxy side of ``transfer-compare``: the sweep study, the trials it transfers, and their FLOPs.

:func:`proxy_side` fills the study to its budget with ``--jobs`` sweep workers
(:func:`run_proxy_study`), ranks its stable trials as ``mupfast transfer`` does, optionally trains
the best ones again at more seeds (:func:`reseed_candidates`) and counts what every trial trained
(:func:`trial_steps`: a pruned trial stops early, which is what the pruner buys).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.config import Config
from mupfast.tuning.launch import job_gpus, run_points, threads_per_job
from mupfast.tuning.sweep.sweep import SweepSpec
from mupfast.tuning.transfer_compare.runs import run_flops, seed_points, seed_stats
from mupfast.tuning.transfer_compare.spec import CompareSpec

#: With --proxy-reseeds, this many × --top of the best stable trials are trained at more seeds.
RESEED_POOL = 2


def trial_steps(trial, steps: int) -> int:
    """Optimizer steps a proxy trial trained: all of them if it completed; otherwise the last step
    its metrics record (what a pruned or failed trial ran before it was stopped), at least the step
    of its last reported val loss."""
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


def _sweep_worker(spec: SweepSpec, log: str) -> None:
    from mupfast.tuning.sweep.sweep import sweep

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)  # its trial lines go to a log; this terminal keeps the main worker's bar
    os.dup2(fd, 2)
    sweep(spec)


def run_proxy_study(spec: SweepSpec, *, jobs: int):
    """Fill the study to its trial budget with ``jobs`` workers (this process and ``jobs - 1``
    spawned ones, each with its share of the threads and its GPU); return it."""
    import multiprocessing as mp

    import optuna

    from mupfast.tuning.storage import open_storage
    from mupfast.tuning.sweep.sweep import _started, study_counts, sweep

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Created here first, so the spawned workers do not race to create the same study.
    existing = optuna.create_study(
        study_name=spec.study_name,
        storage=open_storage(spec.storage),
        direction="minimize",
        load_if_exists=True,
    )
    spec = dataclasses.replace(spec, threads=threads_per_job(jobs))
    sweep_dir = Path(spec.sweep_dir)
    procs = []
    if jobs > 1 and _started(study_counts(existing)) < spec.n_trials:
        ctx = mp.get_context("spawn")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, jobs):
            w = dataclasses.replace(spec, progress=False, gpus=job_gpus(i, jobs))
            log = str(sweep_dir / f"worker{i}.log")
            p = ctx.Process(target=_sweep_worker, args=(w, log), daemon=False)
            p.start()
            procs.append(p)
    try:
        st = sweep(dataclasses.replace(spec, gpus=job_gpus(0, jobs)))
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


@dataclass
class ProxySide:
    """What the proxy study gave: the trials to transfer and what it cost."""

    chosen: list  # the trials transferred, best first (sweep report rows)
    flagged: list  # unstable trials that ranked above a chosen one
    reseeded: list[dict[str, Any]]  # with --proxy-reseeds: each pool trial's losses over seeds
    reseed_flops: float
    trials: list[dict[str, Any]]  # every trial: number, state, value, params, steps trained
    flops: float  # every trial's trained tokens and the re-seed runs
    seconds: float  # the study's wall time


def proxy_side(spec: CompareSpec, storage: str) -> ProxySide:
    """Run (or continue) the proxy study and pick the trials to transfer."""
    from mupfast.tuning.space import load_space
    from mupfast.tuning.stability import DEFAULT_THRESHOLDS
    from mupfast.tuning.sweep.report import collect, rank

    proxy, top = spec.proxy, spec.top
    t0 = time.perf_counter()
    sweep = SweepSpec(
        proxy,
        study_name=spec.study,
        n_trials=spec.trials,
        storage=storage,
        space=spec.space if spec.space is not None else load_space(None, proxy),
        sampler=spec.sampler,
        seed=spec.seed,
        pruner=spec.pruner,
        sweep_dir=(spec.out / "proxy").resolve(),
        progress=spec.progress and sys.stderr.isatty(),
        top=top,
    )
    st = run_proxy_study(sweep, jobs=spec.jobs)
    seconds = time.perf_counter() - t0
    rows = collect(st, DEFAULT_THRESHOLDS)
    chosen, flagged = rank(rows, top)
    reseeded, reseed_flops = [], 0.0
    if spec.proxy_reseeds and chosen:
        chosen, reseeded, reseed_flops = reseed_candidates(
            proxy,
            rank(rows, RESEED_POOL * top)[0],
            top=top,
            reseeds=spec.proxy_reseeds,
            out_dir=spec.out / "proxy-reseeds",
            jobs=spec.jobs,
            progress=spec.progress,
        )
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state.name == "COMPLETE" else None,
            "params": dict(t.params),
            "steps": trial_steps(t, proxy.train.steps),
        }
        for t in st.get_trials(deepcopy=False)
    ]
    flops = sum(run_flops(proxy, t["steps"]) for t in trials) + reseed_flops
    return ProxySide(chosen, flagged, reseeded, reseed_flops, trials, flops, seconds)
