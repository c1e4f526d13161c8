"""One PBT member: its directory, its segment configs, one segment as a child run, exploit's copy.

A member lives in ``<pbt_dir>/member-NN/``: the trainer's run directory (metrics, checkpoints), with
``configs/gen-GGG.yaml`` and ``logs/gen-GGG.log`` per generation. Segment g is ``mupfast train`` on
the proxy config with the member's hyperparameters and ``train.steps = S``, ``train.stop_at =
(g+1)·K``, ``train.resume = true``: it resumes from the member's checkpoint at step g·K, trains K
steps on the lr schedule of the whole S-step run, evaluates and saves there. It is launched as sweep
trials are (:func:`mupfast.tuning.launch.run_child`), beats its claim's heartbeat while it trains,
and is sent SIGTERM if the worker that started it dies.

Checkpoints (:mod:`mupfast.rundir`): before a segment the member's checkpoints are rolled back to
exactly its tag of step g·K (a killed earlier attempt may have saved a later one), after a
successful segment only the newest tag is kept, and exploit replaces the target's tags by a copy of
the source's newest one, written aside and renamed and always redone whole, so re-applying a
decision is harmless.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mupfast import rundir
from mupfast.config import Config, with_overrides
from mupfast.tuning.launch import ChildRun, Launch, run_child
from mupfast.tuning.pbt.schema import Segment
from mupfast.tuning.trial import trial_config


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


def copy_checkpoint(src_run: Path, dst_run: Path, step: int) -> None:
    """Exploit's copy: ``dst``'s checkpoints become exactly ``src``'s tag of ``step`` (idempotent)."""
    try:
        rundir.copy_checkpoint(src_run, dst_run, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"exploit: {e}") from None


def keep_latest(run_dir: Path) -> None:
    """After a successful segment: only the member's newest checkpoint stays on disk."""
    rundir.keep_latest(rundir.checkpoint_dir(run_dir))


# ----------------------------------------------------------------------------------------------
# One segment


def _classify(child: ChildRun, stop: int, ckpt_dir: Path) -> tuple[str, float | None, str | None]:
    """(ok | crash | nonfinite, val loss, reason) of a child that exited."""
    records = child.records
    if child.returncode != 0:
        reason = child.failure_reason()
        return ("nonfinite" if "non-finite" in reason else "crash"), None, reason
    vals = [r.get("val_loss") for r in records if r.get("kind") == "eval" and r.get("step") == stop]
    if not vals:
        if any(r.get("kind") == "event" and r.get("nonfinite_loss") for r in records):
            return "nonfinite", None, f"non-finite losses: no val loss at step {stop}"
        return "crash", None, f"no val loss at step {stop}"
    val = vals[-1]
    if val is None or not math.isfinite(val):
        return "nonfinite", None, f"non-finite val loss at step {stop}"
    if not (ckpt_dir / rundir.checkpoint_tag(stop)).is_dir():
        return "crash", float(val), f"no checkpoint saved at step {stop}"
    return "ok", float(val), None


class _Claim:
    """Keeps a segment's claim alive: the heartbeat every ``heartbeat_s``; False once it is lost."""

    def __init__(self, heartbeat: Callable[[int | None], bool], heartbeat_s: float, stop_event):
        self.heartbeat, self.heartbeat_s, self.stop_event = heartbeat, heartbeat_s, stop_event
        self.last = time.monotonic()

    def started(self, pid: int) -> bool:
        self.last = time.monotonic()
        return self.heartbeat(pid)

    def tick(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            return False  # the process is stopping: the claim is given back
        if time.monotonic() - self.last >= self.heartbeat_s:
            self.last = time.monotonic()
            return self.heartbeat(None)
        return True


def run_segment(
    cfg: Config,
    run_dir: Path,
    *,
    member: int,
    generation: int,
    hparams: dict[str, float],
    weights_from: int,
    launch: Launch,
    heartbeat: Callable[[int | None], bool],
    heartbeat_s: float,
    timeout_s: float | None = None,
    stop_event: threading.Event | None = None,
    poll_s: float = 0.2,
) -> Segment | None:
    """Train one segment; its result, or None when the claim was lost or ``stop_event`` was set."""
    stop = cfg.train.stop_at
    start = stop - stop // (generation + 1)

    def result(status: str, val: float | None, reason: str | None, elapsed: float) -> Segment:
        return Segment(
            member, generation, stop, dict(hparams), val, status, reason, weights_from, None, elapsed
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    problem = rundir.rollback(rundir.checkpoint_dir(run_dir), start)
    if problem:
        return result("crash", None, problem, 0.0)
    claim = _Claim(heartbeat, heartbeat_s, stop_event)
    config_path, log = rundir.launch_paths(run_dir, segment=generation)
    child = run_child(
        cfg,
        config_path=config_path,
        log=log,
        launch=launch,
        on_start=claim.started,
        on_tick=claim.tick,
        timeout_s=timeout_s,
        poll_s=poll_s,
        new_records_only=True,  # this segment's records, not the member's earlier ones
        die_with_parent=True,
    )
    elapsed = round(child.elapsed_s, 2)
    if child.ended == "stopped":
        return None
    if child.ended == "timed out":
        return result("crash", None, f"timed out after {elapsed:.0f} s (--segment-timeout)", elapsed)
    status, val, reason = _classify(child, stop, rundir.checkpoint_dir(run_dir))
    return result(status, val, reason, elapsed)
