"""One sweep trial: its config, the child process that trains it, and the verdict on it.

**Each trial is a child process, on CPU too.** :meth:`Worker.objective` writes the trial's resolved
config to ``<sweep_dir>/trial-NNNN/trial.yaml``, starts ``python -m mupfast.cli train --config
trial.yaml`` (on GPUs: ``deepspeed --include localhost:<gpus> --master_port <free port> --module
mupfast.train --config trial.yaml``) in its own process group, and tails the run's ``metrics.jsonl``:
every eval record's val loss goes to ``trial.report``, and when ``trial.should_prune()`` the whole
process group is stopped. Running ``train(cfg)`` in the sweep process instead would save the ~5 s
interpreter start of each trial, but: a pruned trial must be *stopped*, and a thread cannot be;
a hard crash (segfault, the OOM killer, a gloo abort) would end the study instead of one trial;
DeepSpeed keeps one process group and global state per process; and the GPU path needs the
launcher's subprocess anyway. One code path for CPU and GPU, and the one the research recommends.

A trial that exits non-zero (a Python error, a signal), times out, or ends without a finite final
val loss raises :class:`TrialFailed` with the reason in its ``error`` user attribute. Each trial
stores its ``run_dir``, ``worker`` and the stability metrics of :mod:`mupfast.tuning.stability` as user
attributes.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mupfast.config import Config, with_overrides
from mupfast.errors import ConfigError
from mupfast.tuning.space import Range, space_key

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def resolve_launcher(launcher: str) -> str:
    if launcher not in ("auto", "python", "deepspeed"):
        raise ConfigError(f"--launcher: must be auto, python or deepspeed (got {launcher!r})")
    if launcher == "auto":
        import torch

        return "deepspeed" if torch.cuda.is_available() else "python"
    return launcher


def trial_command(config_path: Path, launcher: str, gpus: str | None) -> list[str]:
    """The command line that trains one trial (its config file already written)."""
    if launcher == "python":
        return [sys.executable, "-m", "mupfast.cli", "train", "--config", str(config_path)]
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(exe).exists():
        raise ConfigError("--launcher deepspeed: the deepspeed launcher is not on PATH")
    if gpus is None:
        import torch

        gpus = ",".join(map(str, range(max(torch.cuda.device_count(), 1))))
    from mupfast.distributed.engine import free_port

    return [
        exe,
        "--include",
        f"localhost:{gpus}",
        "--master_port",
        str(free_port()),
        "--module",
        "mupfast.train",
        "--config",
        str(config_path),
    ]


def child_env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}  # a world of its own
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the trial's whole process group (the deepspeed launcher and its ranks too)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class MetricsTail:
    """New complete lines of a growing metrics.jsonl."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        import json

        if not self.path.is_file():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn or foreign line must not end the study
                continue
        return out


def failure_reason(returncode: int, log: Path) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = f"killed by {name}"
    else:
        why = f"exit code {returncode}"
    lines = (
        [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if log.is_file()
        else []
    )
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"{why}: {last[:300]}" if last else why


@dataclass
class Worker:
    """How this process runs trials (the same for all of its trials)."""

    base: Config
    space: dict[str, Range]
    sweep_dir: Path
    launcher: str = "python"
    gpus: str | None = None
    threads: int | None = None
    trial_timeout_s: float | None = None
    keep_checkpoints: bool = False
    poll_s: float = 0.5
    on_progress: Callable[[str], None] | None = None

    def objective(self, trial) -> float:
        import optuna

        from mupfast.tuning.stability import run_stability

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
        config_path = run_dir / "trial.yaml"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = run_dir / "train.log"
        cmd = trial_command(config_path, self.launcher, self.gpus)
        steps = cfg.train.steps

        t0 = time.monotonic()
        tail = MetricsTail(run_dir / "metrics.jsonl")
        pruned_at = timed_out = None
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(self.threads),
                start_new_session=True,
            )
            try:
                while pruned_at is None and timed_out is None:
                    done = proc.poll() is not None  # read after the poll: nothing written is missed
                    for rec in tail.read():
                        if rec.get("kind") == "train" and self.on_progress:
                            self.on_progress(f"trial {trial.number} step {rec['step']}/{steps}")
                        if rec.get("kind") != "eval" or not math.isfinite(rec.get("val_loss", math.nan)):
                            continue
                        trial.report(rec["val_loss"], rec["step"])
                        if self.on_progress:
                            self.on_progress(
                                f"trial {trial.number} step {rec['step']}/{steps} val {rec['val_loss']:.4f}"
                            )
                        if rec["step"] < steps and trial.should_prune():
                            pruned_at = (rec["step"], rec["val_loss"])
                            break
                    if done:
                        break
                    if self.trial_timeout_s and time.monotonic() - t0 > self.trial_timeout_s:
                        timed_out = time.monotonic() - t0
                        break
                    time.sleep(self.poll_s)
            finally:  # pruned, timed out, or the driver interrupted: never leave a run behind
                stop_process_group(proc)
        returncode = proc.returncode

        from mupfast.rundir import read_metrics

        try:
            records = read_metrics(run_dir)
        except ValueError:  # an unreadable metrics file: judged below as a run without a final val loss
            records = []
        stability = run_stability(records)
        trial.set_user_attr("stability", stability)
        trial.set_user_attr("elapsed_s", round(time.monotonic() - t0, 1))
        trial.set_user_attr("returncode", returncode)
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_at[0]} (val loss {pruned_at[1]:.4f})")
        if timed_out is not None:
            reason = f"timed out after {timed_out:.0f} s (--trial-timeout)"
        elif returncode != 0:
            reason = failure_reason(returncode, log)
        else:
            finals = [r["val_loss"] for r in records if r.get("kind") == "eval" and r.get("step") == steps]
            if not finals:
                reason = f"no val loss at the final step {steps}"
            elif not math.isfinite(finals[-1]):
                reason = "non-finite final val loss"
            else:
                return float(finals[-1])
        trial.set_user_attr("error", reason)
        raise TrialFailed(reason)
