"""One PBT member: its segment configs, its checkpoints, and one segment as a child training run.

A member lives in ``<pbt_dir>/member-NN/``: the trainer's run directory (``metrics.jsonl``,
``checkpoints/``), with ``configs/gen-GGG.yaml`` and ``logs/gen-GGG.log`` per generation. Segment g
is ``mupfast train`` on the proxy config with the member's hyperparameters and ``train.steps = S``,
``train.stop_at = (g+1)·K``, ``train.resume = true``: it resumes from the member's checkpoint at
step g·K, trains K steps on the lr schedule of the whole S-step run, evaluates and saves there. The
child is started as sweep trials are (:mod:`~mupfast.tuning.trial`: the same command, the same
environment, its own process group), and is sent SIGTERM if the worker thread that started it dies.

Checkpoints: before a segment the member's ``checkpoints/`` is set to exactly its tag of step g·K
(a killed earlier attempt may have saved a later one), after a successful segment only the newest
tag is kept, and exploit replaces the target's tags by a copy of the source's newest one; a copy
is written aside and renamed, and always redone whole, so re-applying a decision is harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from mupfast.atomic import write_text_atomically
from mupfast.config import Config, with_overrides
from mupfast.rundir import checkpoint_tag
from mupfast.tuning.pbt.schema import Segment
from mupfast.tuning.trial import (
    MetricsTail,
    child_env,
    failure_reason,
    stop_process_group,
    trial_command,
    trial_config,
)

try:  # Linux: a child that outlives its worker (SIGKILL, OOM) would train on beside a new one
    _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _die_with_worker() -> None:  # runs in the child between fork and exec: no imports, no locks
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def member_dir(pbt_dir: Path, member: int) -> Path:
    return Path(pbt_dir) / f"member-{member:02d}"


def segment_config(
    base: Config, hparams: dict[str, float], run_dir: Path, *, generation: int, interval: int, steps: int
) -> Config:
    """The config of one segment: the proxy with the member's values, resuming, stopping at (g+1)·K."""
    cfg = trial_config(base, hparams, run_dir, keep_checkpoint=True)
    return with_overrides(
        cfg,
        {
            "train.steps": steps,
            "train.stop_at": (generation + 1) * interval,
            "train.resume": True,
            "train.eval_every": interval,
            "train.save_every": 0,
            "train.save_final": True,
            "train.progress": False,
        },
    )


def train_command(config_path: Path, launcher: str, gpus: str | None) -> list[str]:
    """The command that trains one segment (the sweep's trial command; tests replace it)."""
    return trial_command(config_path, launcher, gpus)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []


def rollback(ckpt_dir: Path, step: int) -> str | None:
    """Leave exactly the tag of ``step`` (none for step 0) as the latest; the problem, if any."""
    if step == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return None
    tag = checkpoint_tag(step)
    if not (ckpt_dir / tag).is_dir():
        return f"no checkpoint {ckpt_dir / tag} to resume from"
    latest = ckpt_dir / "latest"
    if not (latest.is_file() and latest.read_text().strip() == tag):
        write_text_atomically(latest, tag)
    for other in tags(ckpt_dir):
        if other > tag:
            shutil.rmtree(ckpt_dir / other, ignore_errors=True)
    return None


def keep_latest(ckpt_dir: Path) -> None:
    """Delete every tag but the one ``latest`` names (disk does not grow with generations)."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return
    keep = latest.read_text().strip()
    for other in tags(ckpt_dir):
        if other != keep:
            shutil.rmtree(ckpt_dir / other, ignore_errors=True)
    for tmp in ckpt_dir.glob(".copy-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def copy_checkpoint(src_run: Path, dst_run: Path, step: int) -> None:
    """Exploit's copy: ``dst``'s checkpoints become exactly ``src``'s tag of ``step`` (idempotent)."""
    src, dst = src_run / "checkpoints", dst_run / "checkpoints"
    tag = checkpoint_tag(step)
    if not (src / tag).is_dir():
        raise FileNotFoundError(f"exploit: the source checkpoint {src / tag} is missing")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".copy-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src / tag, tmp)
    shutil.rmtree(dst / tag, ignore_errors=True)
    tmp.rename(dst / tag)
    write_text_atomically(dst / "latest", tag)
    keep_latest(dst)


# ----------------------------------------------------------------------------------------------
# One segment


def _classify(
    returncode: int, log: Path, records: list[dict], stop: int, ckpt_dir: Path
) -> tuple[str, float | None, str | None]:
    """(ok | crash | nonfinite, val loss, reason) of a finished child."""
    if returncode != 0:
        reason = failure_reason(returncode, log)
        return ("nonfinite" if "non-finite" in reason else "crash"), None, reason
    vals = [r.get("val_loss") for r in records if r.get("kind") == "eval" and r.get("step") == stop]
    if not vals:
        if any(r.get("kind") == "event" and r.get("nonfinite_loss") for r in records):
            return "nonfinite", None, f"non-finite losses: no val loss at step {stop}"
        return "crash", None, f"no val loss at step {stop}"
    val = vals[-1]
    if val is None or not math.isfinite(val):
        return "nonfinite", None, f"non-finite val loss at step {stop}"
    if not (ckpt_dir / checkpoint_tag(stop)).is_dir():
        return "crash", float(val), f"no checkpoint saved at step {stop}"
    return "ok", float(val), None


def run_segment(
    cfg: Config,
    run_dir: Path,
    *,
    member: int,
    generation: int,
    hparams: dict[str, float],
    weights_from: int,
    launcher: str,
    gpus: str | None,
    threads: int | None,
    heartbeat: Callable[[int | None], bool],
    heartbeat_s: float,
    timeout_s: float | None = None,
    stop_event: threading.Event | None = None,
    poll_s: float = 0.2,
) -> Segment | None:
    """Train one segment; its result, or None when the claim was lost or ``stop_event`` was set."""
    start, stop = cfg.train.stop_at - _interval(cfg, generation), cfg.train.stop_at
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "configs").mkdir(exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    config_path = run_dir / "configs" / f"gen-{generation:03d}.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = run_dir / "logs" / f"gen-{generation:03d}.log"

    def result(status: str, val: float | None, reason: str | None, elapsed: float) -> Segment:
        return Segment(
            member, generation, stop, dict(hparams), val, status, reason, weights_from, None, elapsed
        )

    problem = rollback(ckpt_dir, start)
    if problem:
        return result("crash", None, problem, 0.0)
    metrics = run_dir / "metrics.jsonl"
    tail = MetricsTail(metrics)
    tail.offset = metrics.stat().st_size if metrics.is_file() else 0  # only this segment's records
    t0 = last_beat = time.monotonic()
    timed_out = lost = False
    records: list[dict] = []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            train_command(config_path, launcher, gpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(threads),
            start_new_session=True,
            preexec_fn=_die_with_worker,
        )
        try:
            if not heartbeat(proc.pid):
                lost = True
            while not lost and proc.poll() is None:
                time.sleep(poll_s)
                if stop_event is not None and stop_event.is_set():
                    lost = True  # the process is stopping: the claim is given back
                    break
                records += tail.read()
                if time.monotonic() - last_beat >= heartbeat_s:
                    last_beat = time.monotonic()
                    lost = not heartbeat(None)
                if timeout_s and time.monotonic() - t0 > timeout_s:
                    timed_out = True
                    break
        finally:  # done, lost, timed out or interrupted: never leave a run behind
            stop_process_group(proc)
    records += tail.read()
    elapsed = round(time.monotonic() - t0, 2)
    if lost:
        return None
    if timed_out:
        return result("crash", None, f"timed out after {elapsed:.0f} s (--segment-timeout)", elapsed)
    status, val, reason = _classify(proc.returncode, log, records, stop, ckpt_dir)
    return result(status, val, reason, elapsed)


def _interval(cfg: Config, generation: int) -> int:
    return cfg.train.stop_at // (generation + 1)
