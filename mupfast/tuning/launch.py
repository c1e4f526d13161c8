"""The one way to launch training runs: one run as a child process, or a grid of runs in parallel.

* :func:`run_child`: one run of ``mupfast train`` as a child process (sweep trials, PBT segments).
  Its config is written to a file, :func:`train_command` starts it (``python -m mupfast.cli train``,
  or the deepspeed launcher: :func:`resolve_launcher`) in a process group of its own with its output
  in a log, and the run's metrics are tailed while it trains: the caller sees every record (Optuna
  prunes a trial on its evals), can stop it (a pruned trial, a PBT claim lost) and gets how it ended.
* :func:`run_points`: a grid of :class:`Point` s (transfer-test, horizon-test, transfer-compare's
  target runs, the experiments): each trained to its end by ``mupfast.train.train``, its value the
  final val loss (+inf if it diverged); a point already finished with the same config under the same
  rules (:data:`~mupfast.parametrization.RULES_VERSION`) is reused, so a killed grid continues.
* Both share the job's resources: :func:`threads_per_job`, :func:`job_gpus` (one GPU per job, round
  robin) and :func:`default_jobs`; and read and write run directories through :mod:`mupfast.rundir`.

Why a grid point runs in a worker process and a trial in a child: a trial or a segment must be
*stopped* from outside (pruned, timed out, its claim lost), may crash hard (a segfault, the OOM
killer) without ending the study, and on GPUs needs the deepspeed launcher's processes anyway. A
grid point is never stopped and always runs on one device, so ``jobs`` workers (``spawn``) each
train one point after another in-process: no interpreter start and imports per run (~5 s, most of a
CPU grid point), and with ``jobs=1`` in the calling process itself. Both train the same config to
the same losses (the transfer-compare tests retrain a trial as a grid point and find its value).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mupfast import rundir
from mupfast.config import Config, config_from_dict
from mupfast.errors import ConfigError, TrainingError
from mupfast.parametrization import RULES_VERSION

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# Resources: launcher, threads, GPUs


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_jobs() -> int:
    """One run per GPU where there are GPUs, else up to 2 CPU runs at a time."""
    return gpu_count() or min(2, os.cpu_count() or 1)


def threads_per_job(jobs: int) -> int:
    """Torch threads of each of ``jobs`` runs sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def job_gpus(job: int, jobs: int, n_gpus: int | None = None) -> str | None:
    """The GPU of job ``job`` of ``jobs`` (round robin over ``n_gpus``, default the visible ones), or
    None: a single job, or a machine without GPUs, has them all."""
    n = gpu_count() if n_gpus is None else n_gpus
    return str(job % n) if n and jobs > 1 else None


def resolve_launcher(launcher: str) -> str:
    """``python`` or ``deepspeed``; ``auto`` is deepspeed where CUDA is present."""
    if launcher not in ("auto", "python", "deepspeed"):
        raise ConfigError(f"--launcher: must be auto, python or deepspeed (got {launcher!r})")
    if launcher == "auto":
        import torch

        return "deepspeed" if torch.cuda.is_available() else "python"
    return launcher


@dataclass(frozen=True)
class Launch:
    """How this job's child runs start: the launcher (resolved), its GPUs, its torch threads."""

    launcher: str = "python"
    gpus: str | None = None
    threads: int | None = None


def train_command(config_path: Path, launcher: str, gpus: str | None) -> list[str]:
    """The command line that trains one run from its config file (tests replace it)."""
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


def child_env(launch: Launch) -> dict[str, str]:
    """The child's environment: a world of its own, its threads; under python, only its GPUs."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if launch.threads:
        env["OMP_NUM_THREADS"] = str(launch.threads)
    if launch.launcher == "python" and launch.gpus is not None:  # deepspeed takes them by --include
        env["CUDA_VISIBLE_DEVICES"] = launch.gpus
    return env


# ----------------------------------------------------------------------------------------------
# One run as a child process


try:  # Linux: a child that outlives its parent (SIGKILL, OOM) would train on beside a new one
    _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec: no imports, no locks
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the run's whole process group (the deepspeed launcher and its ranks too)."""
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
    """New complete records of a run's growing metrics file (:func:`mupfast.rundir.metrics_path`)."""

    def __init__(self, run_dir: str | Path, *, from_end: bool = False):
        self.path = rundir.metrics_path(run_dir)
        self.offset = self.path.stat().st_size if from_end and self.path.is_file() else 0

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
    """Why a child failed: the signal or exit code, and its last ``error:`` line (else its last line)."""
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
class ChildRun:
    """How a child run ended: ``exited`` (by itself), ``stopped`` (the caller said so) or ``timed out``."""

    ended: str
    returncode: int
    log: Path
    watched_s: float  # when the watch ended (the timeout's measure)
    elapsed_s: float  # when the child was gone
    records: list[dict] = field(default_factory=list)  # every metrics record seen while watching

    def failure_reason(self) -> str:
        return failure_reason(self.returncode, self.log)


def run_child(
    cfg: Config,
    *,
    config_path: Path,
    log: Path,
    launch: Launch,
    on_start: Callable[[int], bool] | None = None,
    on_records: Callable[[list[dict]], bool] | None = None,
    on_tick: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    new_records_only: bool = False,
    die_with_parent: bool = False,
) -> ChildRun:
    """Train ``cfg`` (written to ``config_path``) as a child process, its output to ``log``; watch it.

    Every ``poll_s``: the new metrics records go to ``on_records`` (only this run's records with
    ``new_records_only``: a resumed run appends to its file), and while the child runs ``on_tick``
    is called; either returning False stops the run, as does ``timeout_s`` and ``on_start(pid)``
    returning False. However it ends, the child's whole process group is gone when this returns.
    """
    config_path.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tail = MetricsTail(cfg.train.run_dir, from_end=new_records_only)
    records: list[dict] = []
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            train_command(config_path, launch.launcher, launch.gpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(launch),
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
        try:
            ended = "stopped" if on_start is not None and not on_start(proc.pid) else None
            while ended is None:
                done = proc.poll() is not None  # read after the poll: nothing written is missed
                new = tail.read()
                records += new
                if on_records is not None and new and not on_records(new):
                    ended = "stopped"
                elif done:
                    ended = "exited"
                elif timeout_s and time.monotonic() - t0 > timeout_s:
                    ended = "timed out"
                elif on_tick is not None and not on_tick():
                    ended = "stopped"
                else:
                    time.sleep(poll_s)
            watched_s = time.monotonic() - t0
        finally:  # done, stopped, timed out or interrupted: never leave a run behind
            stop_process_group(proc)
    records += tail.read()
    return ChildRun(ended, proc.returncode, log, watched_s, time.monotonic() - t0, records)


# ----------------------------------------------------------------------------------------------
# A grid of runs


@dataclass(frozen=True)
class Point:
    parametrization: str
    size: int
    lr: float
    seed: int
    run_dir: str
    cfg: Config


def lr_tag(lr: float) -> str:
    """How an lr names its run directory and progress line: 2^-7 for powers of two, else 4 digits."""
    e = math.log2(lr)
    return f"2^{e:g}" if abs(e - round(e)) < 1e-9 else f"{lr:.4g}"


def grid_run_dir(
    out: str | Path, parametrization: str, axis: str, size: int, lr: float, seed: int, *, value: str = "lr"
) -> Path:
    """Where a grid point trains: ``<out>/runs/<parametrization>/<axis><size>/lr<lr>/seed<seed>``.

    ``axis`` is what the grid varies besides the lr: ``width``, ``depth``, ``steps`` (a horizon) or
    ``batch``; ``value`` names what is gridded at each size (``lr``, or ``wd`` for a weight-decay grid).
    """
    return Path(out, "runs", parametrization, f"{axis}{size}", f"{value}{lr_tag(lr)}", f"seed{seed}")


def grid_run_overrides(seed: int, run_dir: Path) -> dict[str, Any]:
    """The train keys of one grid run: its seed and own directory, fresh, quiet, metrics only."""
    return {
        "train.seed": seed,
        "train.run_dir": str(run_dir),
        "train.progress": False,
        "train.resume": False,
        "train.eval_every": 0,
        "train.save_every": 0,
    }


def mean_loss(values: Sequence[float]) -> float:
    """Mean over seeds; inf if any seed diverged."""
    vals = [v if math.isfinite(v) else math.inf for v in values]
    return math.inf if any(math.isinf(v) for v in vals) else sum(vals) / len(vals)


def finished_loss(point: Point) -> float | None:
    """The val loss of a point already run with the same config (inf if it diverged), else None."""
    summary, saved = rundir.read_summary(point.run_dir), rundir.read_config(point.run_dir)
    if summary is None or saved is None:
        return None
    # Keys added to the config since the run was made compare at their defaults (config_from_dict);
    # a run made under older rules (the same config trained differently then) is not reused.
    if summary.get("rules_version") != RULES_VERSION:
        return None
    try:
        if saved != point.cfg.to_dict() and config_from_dict(saved).to_dict() != point.cfg.to_dict():
            return None
    except (ConfigError, TypeError, AttributeError):
        return None
    val = summary.get("final_val_loss")
    return float(val) if val is not None and math.isfinite(val) else math.inf


def run_point(point: Point) -> tuple[float, float, str]:
    """Train one point; returns (final val loss or inf, seconds, status). Keeps metrics, drops checkpoints."""
    from mupfast.train import train

    run_dir = Path(point.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt starts over
    t0 = time.perf_counter()
    status = "ok"
    try:
        result = train(point.cfg)
        val = result.val_losses.get(result.steps, math.nan)
    except TrainingError as e:
        val, status = math.nan, f"diverged: {e}"
    if not math.isfinite(val):
        status = status if status != "ok" else "diverged: non-finite val loss"
        if rundir.read_config(run_dir) is None:  # the trainer writes it first; keep reuse working anyway
            rundir.write_config(run_dir, point.cfg.to_dict())
        rundir.write_summary(
            run_dir, {"final_val_loss": None, "status": status, "rules_version": RULES_VERSION}
        )
    shutil.rmtree(rundir.checkpoint_dir(run_dir), ignore_errors=True)  # a grid keeps metrics, not weights
    return (val if math.isfinite(val) else math.inf), time.perf_counter() - t0, status


def _init_worker(threads: int, counter, jobs: int, n_gpus: int) -> None:
    import logging

    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    gpus = job_gpus(index, jobs, n_gpus)  # counted by the parent: CUDA reads its devices once
    if gpus is not None:  # set before CUDA is first touched in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus

    import torch

    from mupfast.distributed.engine import free_port

    torch.set_num_threads(threads)
    # Each worker is its own one-process world; a port inherited from the parent would collide.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _worker(point: Point) -> tuple[Point, float, float, str]:
    # DeepSpeed prints to stdout; keep the grid's terminal to the progress bar and the run's log file.
    Path(point.run_dir).parent.mkdir(parents=True, exist_ok=True)
    log = rundir.grid_log_path(point.run_dir)
    with log.open("w") as f:
        out_fd, err_fd = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            val, secs, status = run_point(point)
        finally:
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            os.close(out_fd)
            os.close(err_fd)
    return point, val, secs, status


def _label(pt: Point) -> str:
    # The value's folder says what the grid varies at each size: "lr2^-6", or "wd2^-3" for a weight-decay grid.
    return f"{pt.parametrization} {pt.size} {Path(pt.run_dir).parent.name}"


def _run_in_workers(todo: list[Point], jobs: int, values: dict[str, float], bar) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    init_args = (threads_per_job(jobs), ctx.Value("i", 0), jobs, gpu_count())
    with ctx.Pool(jobs, initializer=_init_worker, initargs=init_args) as pool:
        for pt, val, secs, status in pool.imap_unordered(_worker, todo):
            values[pt.run_dir] = val
            bar.set_postfix_str(f"{_label(pt)}: {val:.3f} ({secs:.0f}s)")
            if status != "ok":
                bar.write(f"{pt.run_dir}: {status}")
            bar.update(1)


def run_points(
    points: list[Point], *, jobs: int, progress: bool = True, desc: str = "transfer-test"
) -> dict[str, float]:
    """Val loss of every point (by run_dir), skipping finished ones; runs the rest on ``jobs`` processes."""
    from mupfast.progress import progress_bar

    values: dict[str, float] = {}
    todo = []
    for pt in points:
        done = finished_loss(pt)
        if done is None:
            todo.append(pt)
        else:
            values[pt.run_dir] = done
    # Largest models first, so the last runs to finish are short ones.
    todo.sort(key=lambda pt: -(pt.cfg.model.hidden_size**2 * pt.cfg.model.num_layers))
    bar = progress_bar(len(points), initial=len(values), desc=desc, unit="run", disable=not progress)
    try:
        if jobs <= 1:
            for pt in todo:
                bar.set_postfix_str(_label(pt))
                values[pt.run_dir] = run_point(pt)[0]
                bar.update(1)
        else:
            _run_in_workers(todo, jobs, values, bar)
    finally:
        bar.close()
    return values
