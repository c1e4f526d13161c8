"""One sweep trial: its config, its training run (a child process, pruned while it trains), its verdict.

:meth:`Worker.objective` trains the trial through :func:`mupfast.tuning.launch.run_child` (its
config in ``<sweep_dir>/trial-NNNN/trial.yaml``, its output in ``train.log`` there), reports every
eval record's val loss to ``trial.report`` and stops the run when ``trial.should_prune()``. A trial
that exits non-zero (a Python error, a signal), times out, or ends without a finite final val loss
raises :class:`TrialFailed` with the reason in its ``error`` user attribute. Each trial stores its
``run_dir``, ``worker`` and the stability metrics of :mod:`mupfast.tuning.stability` as user
attributes.

A trial whose worker died (a node lost: no heartbeat for the grace period) is failed by the next
worker and queued again with the same values; the retry resumes from the newest checkpoint the dead
attempt left (with ``train.save_every`` set), copied into its own run directory, on the GPUs of
whichever worker takes it: another number of ranks goes through the elastic resume
(:mod:`mupfast.distributed.elastic`), as a PBT member's exploit copy does.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mupfast import rundir
from mupfast.config import Config, with_overrides
from mupfast.errors import CheckpointError, ConfigError
from mupfast.tuning.launch import ChildRun, Launch, run_child
from mupfast.tuning.space import Range, space_key
from mupfast.tuning.storage import retry_history


class TrialFailed(RuntimeError):
    """A trial that crashed, timed out or ended without a finite val loss (the study goes on)."""


def trial_config(
    base: Config,
    params: dict[str, float],
    run_dir: str | Path,
    *,
    keep_checkpoint: bool = False,
    resume: bool = False,
) -> Config:
    """The proxy config with the trial's values, writing to ``run_dir``, starting fresh (``resume``: from
    the checkpoint put there, :func:`earlier_checkpoint`).

    Without ``keep_checkpoint`` the trial writes no final checkpoint: a sweep keeps metrics, not weights.
    """
    values = {space_key(name, base): float(value) for name, value in params.items()}
    values.update({"train.run_dir": str(run_dir), "train.progress": False, "train.resume": resume})
    if not keep_checkpoint:
        values["train.save_final"] = False
    return with_overrides(base, values)


def trial_dir(sweep_dir: Path, number: int) -> Path:
    """Trial ``number``'s run directory under the sweep's folder."""
    return (Path(sweep_dir) / f"trial-{number:04d}").resolve()


def earlier_attempts(trial, sweep_dir: Path) -> list[Path]:
    """The run directories of the trials this one retries, newest first: a trial whose worker died
    (no heartbeat for the grace period) is queued again with its values by Optuna's
    ``RetryHeartbeatStaleTrialCallback`` (mupfast.tuning.storage), which records them in
    ``retry_history``."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return [trial_dir(sweep_dir, n) for n in reversed(retry_history(frozen))]


def earlier_checkpoint(attempts: list[Path]) -> tuple[Path, int] | None:
    """(run directory, step) of the newest checkpoint an earlier attempt left (``train.save_every``)."""
    for run in attempts:
        try:
            tag = rundir.latest_tag(rundir.checkpoint_dir(run))
        except CheckpointError:  # ``latest`` names a tag that is gone: look further back
            continue
        if tag is not None:
            return run, int(tag.removeprefix("step"))
    return None


@dataclass
class _Pruning:
    """Watches a trial's metrics: reports its val losses to Optuna, says when the pruner stops it."""

    trial: object
    steps: int
    on_progress: Callable[[str], None] | None
    pruned_at: tuple[int, float] | None = None

    def see(self, records: list[dict]) -> bool:
        """False (stop the run) once the pruner prunes the trial."""
        n, steps = self.trial.number, self.steps
        for rec in records:
            if rec.get("kind") == "train" and self.on_progress:
                self.on_progress(f"trial {n} step {rec['step']}/{steps}")
            if rec.get("kind") != "eval" or not math.isfinite(rec.get("val_loss", math.nan)):
                continue
            self.trial.report(rec["val_loss"], rec["step"])
            if self.on_progress:
                self.on_progress(f"trial {n} step {rec['step']}/{steps} val {rec['val_loss']:.4f}")
            if rec["step"] < steps and self.trial.should_prune():
                self.pruned_at = (rec["step"], rec["val_loss"])
                return False
        return True


def final_val_loss(child: ChildRun, records: list[dict], steps: int) -> tuple[float | None, str | None]:
    """(the trial's value, None) for a run that reached a finite val loss at ``steps``, else (None, why)."""
    if child.ended == "timed out":
        return None, f"timed out after {child.watched_s:.0f} s (--trial-timeout)"
    if child.returncode != 0:
        return None, child.failure_reason()
    finals = [r["val_loss"] for r in records if r.get("kind") == "eval" and r.get("step") == steps]
    if not finals:
        return None, f"no val loss at the final step {steps}"
    if not math.isfinite(finals[-1]):
        return None, "non-finite final val loss"
    return float(finals[-1]), None


@dataclass
class Worker:
    """How this process runs trials (the same for all of its trials)."""

    base: Config
    space: dict[str, Range]
    sweep_dir: Path
    launch: Launch = field(default_factory=Launch)
    trial_timeout_s: float | None = None
    keep_checkpoints: bool = False
    poll_s: float = 0.5
    on_progress: Callable[[str], None] | None = None

    def objective(self, trial) -> float:
        import optuna

        params = {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in self.space.items()}
        run_dir = trial_dir(self.sweep_dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        attempts = earlier_attempts(trial, self.sweep_dir)
        earlier = earlier_checkpoint(attempts)
        try:
            cfg = trial_config(
                self.base, params, run_dir, keep_checkpoint=self.keep_checkpoints, resume=earlier is not None
            )
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            raise TrialFailed(str(e)) from None
        if run_dir.exists():  # left over from a deleted study of the same name
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        if earlier is not None:  # on from where the dead worker's run got, on this worker's GPUs
            rundir.copy_checkpoint(earlier[0], run_dir, earlier[1])
            trial.set_user_attr("resumed_from", f"{earlier[0]} step {earlier[1]}")
        pruning = _Pruning(trial, cfg.train.steps, self.on_progress)
        config_path, log = rundir.launch_paths(run_dir)
        child = run_child(
            cfg,
            config_path=config_path,
            log=log,
            launch=self.launch,
            on_records=pruning.see,
            timeout_s=self.trial_timeout_s,
            poll_s=self.poll_s,
        )
        records = self._record(trial, [run_dir, *attempts], child)
        if pruning.pruned_at is not None:
            step, val = pruning.pruned_at
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {val:.4f})")
        value, reason = final_val_loss(child, records, cfg.train.steps)
        if value is not None:
            return value
        trial.set_user_attr("error", reason)
        raise TrialFailed(reason)

    def _record(self, trial, runs: list[Path], child: ChildRun) -> list[dict]:
        """Store the run's stability, time and exit code with the trial; its metrics records. ``runs``:
        the trial's run directory, then those of the attempts it resumed (their checkpoints go too)."""
        from mupfast.tuning.stability import run_stability

        run_dir = runs[0]
        try:
            records = rundir.read_metrics(run_dir)
        except ValueError:  # an unreadable metrics file: judged as a run without a final val loss
            records = []
        trial.set_user_attr("stability", run_stability(records))
        trial.set_user_attr("elapsed_s", round(child.elapsed_s, 1))
        trial.set_user_attr("returncode", child.returncode)
        if not self.keep_checkpoints:
            for run in runs:
                shutil.rmtree(rundir.checkpoint_dir(run), ignore_errors=True)
        return records
