"""Proxy hyperparameter sweep: an Optuna study in which every trial is a real training run.

``mupfast sweep --config proxy.yaml --trials N --space space.yaml --storage URL --study NAME``
samples the μTransferable hyperparameters (lr, init std, embeddings_scale, output_logits_alpha,
attention_logits_alpha — log-uniform ranges from a space file, or the built-in defaults), trains the
proxy once per trial and minimises the final validation loss. This module is the driver: the
sampler, the pruner and the loop that takes trials until the study is full. The pieces:
:mod:`~mupfast.tuning.space` (the ranges), :mod:`~mupfast.tuning.storage` (the database and
the shared study) and :mod:`~mupfast.tuning.trial` (one trial, a child run started by
:mod:`~mupfast.tuning.launch`).

A failed trial is marked FAIL with the reason in its ``error`` user attribute; the study goes on
(``optimize(catch=TrialFailed)``). The study stores the proxy config and the space, so
``--report`` and ``mupfast transfer`` work from the storage alone (and read the run directories
where they exist). ``--trials N`` is the study's budget, not one worker's: every worker takes
trials until the study holds N (running ones included), so a killed sweep is continued by running
the same command again and several workers split the budget (two workers starting a trial at the
same instant can overshoot it by one each). A dead worker's trial is queued again in its own place
in the budget, and resumed (:mod:`~mupfast.tuning.trial`).

Sampling: ``random`` draws trial k's values from a seed derived from (study seed, k), so the
points do not depend on which worker ran them and two workers never draw the same sequence;
``tpe`` is Optuna's multivariate TPE with the constant liar (its startup trials use the same
per-trial random draws).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.config import Config, load_config
from mupfast.errors import ConfigError
from mupfast.tuning.space import Range, load_space, space_dict
from mupfast.tuning.storage import (
    claim_study_attr,
    default_storage,
    load_study,
    open_storage,
    redact,
    retry_history,
)
from mupfast.tuning.sweep.report import add_study_arguments, thresholds_from
from mupfast.tuning.trial import TrialFailed, Worker


def hash_name(text: str) -> int:
    """A stable 32-bit seed from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def make_sampler(kind: str, seed: int, startup_trials: int = 10):
    """random, or tpe whose first ``startup_trials`` trials are random draws (Optuna's default: 10,
    so a study of 10 trials or fewer is random search under either name)."""
    import optuna

    class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
        """Random search whose draw for trial k depends only on (seed, k, parameter)."""

        def sample_independent(self, study, trial, param_name, param_distribution):
            sub = optuna.samplers.RandomSampler(seed=hash_name(f"{seed}:{trial.number}:{param_name}"))
            return sub.sample_independent(study, trial, param_name, param_distribution)

    if kind == "random":
        return TrialSeededRandomSampler(seed=seed)
    if kind == "tpe":
        if startup_trials < 1:
            raise ConfigError(f"--startup-trials: must be at least 1 (got {startup_trials})")
        tpe = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup_trials
        )
        if hasattr(tpe, "_random_sampler"):  # startup trials: the same per-trial draws as random
            tpe._random_sampler = TrialSeededRandomSampler(seed=seed)
        return tpe
    raise ConfigError(f"--sampler: must be random or tpe (got {kind!r})")


def make_pruner(kind: str):
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner: must be median, hyperband or none (got {kind!r})")


# ----------------------------------------------------------------------------------------------
# The study driver


def study_counts(study) -> dict[str, int]:
    """Trials by state; a FAIL whose worker died and that was queued again counts as RETRIED: its
    retry (Optuna's ``retry_history`` names it) takes its place in the budget."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retry_history(t)}
    counts: dict[str, int] = {}
    for t in trials:
        state = "RETRIED" if t.state.name == "FAIL" and t.number in retried else t.state.name
        counts[state] = counts.get(state, 0) + 1
    return counts


def _started(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))


def _finished(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))


def trial_line(t) -> str:
    """One line about a finished trial."""
    params = "  ".join(f"{k}={v:.3g}" for k, v in t.params.items())
    if t.state.name == "COMPLETE":
        stab = t.user_attrs.get("stability") or {}
        flag = "stable" if stab.get("stable") else f"UNSTABLE ({stab.get('why', '?')})"
        head = f"val {t.value:.4f}  {flag}"
    elif t.state.name == "PRUNED":
        last = max(t.intermediate_values) if t.intermediate_values else None
        head = f"pruned at step {last}" if last is not None else "pruned"
    else:
        head = f"FAILED: {t.user_attrs.get('error', 'unknown error')}"
    return f"trial {t.number:>4} {t.state.name:<8} {head}  [{params}]"


@dataclass
class SweepSpec:
    """One sweep worker's study as ``mupfast sweep``'s flags describe it."""

    base: Config  # the proxy config
    study_name: str
    n_trials: int  # the study's budget, not this worker's
    storage: str | None = None  # default sqlite:///runs/sweeps/<study>.db
    space: dict[str, Range] | None = None  # default the built-in ranges
    sampler: str = "random"
    startup_trials: int = 10
    seed: int | None = None  # default the study's (a new study: drawn)
    pruner: str | Any = "median"  # a name, or an Optuna pruner
    sweep_dir: str | Path | None = None  # default runs/sweeps/<study>
    launcher: str = "auto"
    gpus: str | None = None
    threads: int | None = None
    trial_timeout_s: float | None = None
    keep_checkpoints: bool = False
    progress: bool = True
    top: int = 5


def open_study(spec: SweepSpec, space: dict[str, Range], storage: str, pruner):
    """Create the study or join it (refused if its proxy config or space differ), its sampler set."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines, under the progress bar
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=open_storage(storage, heartbeat=True),
        direction="minimize",
        load_if_exists=True,
        pruner=pruner,
    )
    claim_study_attr(study, "proxy_config", spec.base.to_dict(), "proxy config")
    claim_study_attr(study, "space", space_dict(space), "space")
    seed = spec.seed
    study_seed = claim_study_attr(
        study, "seed", seed if seed is not None else hash_name(str(time.time_ns())), ""
    )
    study.sampler = make_sampler(
        spec.sampler, int(seed if seed is not None else study_seed), spec.startup_trials
    )
    return study


class _Lines:
    """The sweep's terminal: a progress bar of finished trials (when ``progress``), lines above it."""

    def __init__(self, study, spec: SweepSpec, worker: Worker):
        self.bar, self.n = None, spec.n_trials
        if spec.progress:
            from mupfast.progress import progress_bar

            done = min(_finished(study_counts(study)), self.n)
            self.bar = progress_bar(self.n, initial=done, desc=f"sweep {spec.study_name}", unit="trial")
            worker.on_progress = self.bar.set_postfix_str

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def finished(self, study) -> None:
        if self.bar is not None:
            self.bar.n = min(_finished(study_counts(study)), self.n)
            self.bar.set_postfix_str("")
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _take_trials(study, worker: Worker, n_trials: int, after_trial) -> None:
    """Take trials until the study holds ``n_trials``; a SIGTERM stops the running one (marked FAIL)."""
    import optuna
    from optuna.storages import fail_stale_trials

    def on_sigterm(signum, frame):  # a batch system's SIGTERM: stop the trial's run, mark it FAIL
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            with warnings.catch_warnings():  # Optuna calls its heartbeat API experimental; used as documented
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)  # a dead worker's trial: queued again before the budget is counted
            if _started(study_counts(study)) >= n_trials:
                break
            study.optimize(worker.objective, n_trials=1, catch=(TrialFailed,), callbacks=[after_trial])
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def sweep(spec: SweepSpec):
    """Run trials until the study holds ``spec.n_trials``; return the study."""
    from mupfast.tuning.launch import Launch, resolve_launcher
    from mupfast.tuning.sweep.report import format_best

    if spec.n_trials <= 0:
        raise ConfigError(f"--trials: must be positive (got {spec.n_trials})")
    space = spec.space if spec.space is not None else load_space(None, spec.base)
    storage = spec.storage or default_storage(spec.study_name)
    sweep_dir = Path(spec.sweep_dir) if spec.sweep_dir is not None else Path("runs/sweeps") / spec.study_name
    launcher = resolve_launcher(spec.launcher)
    pruner = make_pruner(spec.pruner) if isinstance(spec.pruner, str) else spec.pruner
    study = open_study(spec, space, storage, pruner)
    worker = Worker(
        base=spec.base,
        space=space,
        sweep_dir=sweep_dir,
        launch=Launch(launcher, spec.gpus, spec.threads),
        trial_timeout_s=spec.trial_timeout_s,
        keep_checkpoints=spec.keep_checkpoints,
    )
    lines = _Lines(study, spec, worker)
    lines.say(
        f"study {spec.study_name} in {redact(storage)}: {_finished(study_counts(study))} of {spec.n_trials} "
        f"trials done; {spec.sampler} sampler, {launcher} launcher, runs under {sweep_dir}/"
    )
    if not spec.base.train.eval_every:
        lines.say("note: train.eval_every is 0, so only the final val loss is reported and nothing is pruned")

    def after_trial(study, frozen) -> None:
        lines.say(trial_line(frozen))
        lines.say(format_best(study, spec.top))
        lines.finished(study)

    try:
        _take_trials(study, worker, spec.n_trials, after_trial)
    finally:
        lines.close()
    return study


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_study_arguments(parser)
    parser.add_argument(
        "--trials", type=int, default=20, help="the study's trial budget (default %(default)s)"
    )
    parser.add_argument("--sampler", default="random", help="random or tpe (default %(default)s)")
    parser.add_argument(
        "--space", help="YAML space file (default: the built-in ranges, configs/sweep-space.yaml)"
    )
    parser.add_argument(
        "--startup-trials",
        type=int,
        default=10,
        help="tpe: random trials before TPE models the results (default %(default)s, Optuna's)",
    )
    parser.add_argument("--pruner", default="median", help="median, hyperband or none (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    parser.add_argument("--sweep-dir", help="trial run directories (default runs/sweeps/<study>)")
    parser.add_argument("--launcher", default="auto", help="python, deepspeed, or auto (deepspeed with CUDA)")
    parser.add_argument("--gpus", help="deepspeed: GPUs of this worker, e.g. 0,1 (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each trial")
    parser.add_argument("--trial-timeout", type=float, default=None, help="seconds before a trial is failed")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's checkpoints")
    parser.add_argument("--report", action="store_true", help="report the study: stability, top k, plot")
    parser.add_argument("--plot", help="report plot path (default runs/sweeps/<study>-report.png)")


def run(args: argparse.Namespace) -> int:
    """The ``sweep`` verb: run (or continue) the study, or with ``--report`` rank what it holds."""
    from mupfast.tuning.sweep.report import format_best, report

    cfg = load_config(args.config, args.overrides)
    study = args.study or (Path(args.config).stem if args.config else None)
    if not study:
        raise ConfigError("sweep: --study NAME is required")
    storage = args.storage or default_storage(study)
    if args.report:
        print(
            report(
                load_study(storage, study),
                top_k=10 if args.top_k is None else args.top_k,
                th=thresholds_from(args),
                plot_path=args.plot or f"runs/sweeps/{study}-report.png",
            )
        )
        return 0
    if not args.config:
        raise ConfigError("sweep: --config FILE (the proxy model's config) is required")
    spec = SweepSpec(
        cfg,
        study_name=study,
        storage=storage,
        n_trials=args.trials,
        space=load_space(args.space, cfg),
        sampler=args.sampler,
        startup_trials=args.startup_trials,
        seed=args.seed,
        pruner=args.pruner,
        sweep_dir=args.sweep_dir,
        launcher=args.launcher,
        gpus=args.gpus,
        threads=args.threads,
        trial_timeout_s=args.trial_timeout,
        keep_checkpoints=args.keep_checkpoints,
        progress=sys.stderr.isatty(),
    )
    st = sweep(spec)
    print(format_best(st, args.top_k or 5))
    print(f"next: mupfast sweep --report --study {study} --storage {redact(storage)}")
    return 0
