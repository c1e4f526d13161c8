"""One sweep trial: its config, its training run (a child process, pruned while it trains), its verdict.

:meth:`Worker.objective` trains the trial through :func:`mupfast.tuning.launch.run_child` (its
config in ``<sweep_dir>/trial-NNNN/trial.yaml``, its output in ``train.log`` there), reports every
eval record's val loss to ``trial.report`` and stops the run when ``trial.should_prune()``. A trial
that exits non-zero (a Python error, a signal), times out, or ends without a finite final val loss
raises :class:`TrialFailed` with the reason in its ``error`` user attribute. Each trial stores its
``run_dir``, ``worker`` and the stability metrics of :mod:`mupfast.tuning.stability` as user
attributes.
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
from mupfast.errors import ConfigError
from mupfast.tuning.launch import ChildRun, Launch, run_child
from mupfast.tuning.space import Range, space_key


class TrialFailed(RuntimeError):
    """A trial that crashed, timed out or ended without a finite val loss (the study goes on)."""


def trial_config(
    base: Config, params: dict[str, float], run_dir: str | Path, *, keep_checkpoint: bool = False
) -> Config:
    """The proxy config with the trial's values, writing to ``run_dir``, starting fresh.

    Without ``keep_checkpoint`` the trial writes no final checkpoint: a sweep keeps metrics, not weights.
    """
    values = {space_key(name, base): float(value) for name, value in params.items()}
    values.update({"train.run_dir": str(run_dir), "train.progress": False, "train.resume": False})
    if not keep_checkpoint:
        values["train.save_final"] = False
    return with_overrides(base, values)


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
        run_dir = (self.sweep_dir / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            cfg = trial_config(self.base, params, run_dir, keep_checkpoint=self.keep_checkpoints)
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            raise TrialFailed(str(e)) from None
        if run_dir.exists():  # left over from a deleted study of the same name
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
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
        records = self._record(trial, run_dir, child)
        if pruning.pruned_at is not None:
            step, val = pruning.pruned_at
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {val:.4f})")
        value, reason = final_val_loss(child, records, cfg.train.steps)
        if value is not None:
            return value
        trial.set_user_attr("error", reason)
        raise TrialFailed(reason)

    def _record(self, trial, run_dir: Path, child: ChildRun) -> list[dict]:
        """Store the run's stability, time and exit code with the trial; its metrics records."""
        from mupfast.tuning.stability import run_stability

        try:
            records = rundir.read_metrics(run_dir)
        except ValueError:  # an unreadable metrics file: judged as a run without a final val loss
            records = []
        trial.set_user_attr("stability", run_stability(records))
        trial.set_user_attr("elapsed_s", round(child.elapsed_s, 1))
        trial.set_user_attr("returncode", child.returncode)
        if not self.keep_checkpoints:
            shutil.rmtree(rundir.checkpoint_dir(run_dir), ignore_errors=True)
        return records
