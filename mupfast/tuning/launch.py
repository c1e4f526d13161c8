"""Runs a grid of training runs: one per point, in worker processes, each in its own directory.

transfer-test and horizon-test describe their points (:class:`Point`: a config and a run directory);
this module trains them (``mupfast.train.train``; the point's value is the final validation loss),
reuses a run already finished with the same config under the same rules
(:data:`~mupfast.parametrization.RULES_VERSION`), so a killed sweep continues where it stopped, and
counts a run that diverged (non-finite loss) as +inf. Independent runs go to ``jobs`` worker
processes (``spawn``), each with ``cpu_count // jobs`` torch threads and, on a GPU machine, its own
GPU (round robin over the visible ones; :func:`default_jobs` is one per GPU). A worker's stdout and
stderr go to ``<run_dir>.log`` so the terminal keeps only the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mupfast.config import Config, config_from_dict
from mupfast.errors import ConfigError, TrainingError
from mupfast.parametrization import RULES_VERSION


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


def grid_run_dir(out: str | Path, parametrization: str, axis: str, size: int, lr: float, seed: int) -> Path:
    """Where a grid point trains: ``<out>/runs/<parametrization>/<axis><size>/lr<lr>/seed<seed>``.

    ``axis`` is what the grid varies besides the lr: ``width``, ``depth`` or ``steps`` (a horizon).
    """
    return Path(out, "runs", parametrization, f"{axis}{size}", f"lr{lr_tag(lr)}", f"seed{seed}")


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
    run_dir = Path(point.run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
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
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").is_file():  # the trainer writes it first; keep resume working anyway
            (run_dir / "config.yaml").write_text(yaml.safe_dump(point.cfg.to_dict(), sort_keys=False))
        (run_dir / "summary.json").write_text(
            json.dumps({"final_val_loss": None, "status": status, "rules_version": RULES_VERSION}, indent=2)
        )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a sweep keeps its metrics, not its weights
    return (val if math.isfinite(val) else math.inf), time.perf_counter() - t0, status


def _init_worker(threads: int, counter, n_gpus: int) -> None:
    import logging

    if n_gpus:  # one GPU per worker, round robin; set before CUDA is first touched in this process
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % n_gpus)

    import torch

    from mupfast.distributed.engine import free_port

    torch.set_num_threads(threads)
    # Each worker is its own one-process world; a port inherited from the parent would collide.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _worker(point: Point) -> tuple[Point, float, float, str]:
    # DeepSpeed prints to stdout; keep the sweep's terminal to the progress bar and the run's log file.
    Path(point.run_dir).parent.mkdir(parents=True, exist_ok=True)
    log = Path(point.run_dir).parent / f"{Path(point.run_dir).name}.log"
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


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_jobs() -> int:
    """One run per GPU where there are GPUs, else up to 2 CPU runs at a time."""
    return gpu_count() or min(2, os.cpu_count() or 1)


def run_points(
    points: list[Point], *, jobs: int, progress: bool = True, desc: str = "transfer-test"
) -> dict[str, float]:
    """Val loss of every point (by run_dir), skipping finished ones; runs the rest on ``jobs`` processes."""
    from tqdm.auto import tqdm

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
    bar = tqdm(total=len(points), initial=len(values), desc=desc, unit="run", disable=not progress)
    try:
        if jobs <= 1:
            for pt in todo:
                bar.set_postfix_str(f"{pt.parametrization} {pt.size} lr {lr_tag(pt.lr)}")
                values[pt.run_dir] = run_point(pt)[0]
                bar.update(1)
        else:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = mp.get_context("spawn")
            n_gpus = gpu_count()
            init_args = (threads, ctx.Value("i", 0), n_gpus)
            with ctx.Pool(jobs, initializer=_init_worker, initargs=init_args) as pool:
                for pt, val, secs, status in pool.imap_unordered(_worker, todo):
                    values[pt.run_dir] = val
                    bar.set_postfix_str(
                        f"{pt.parametrization} {pt.size} lr {lr_tag(pt.lr)}: {val:.3f} ({secs:.0f}s)"
                    )
                    if status != "ok":
                        bar.write(f"{pt.run_dir}: {status}")
                    bar.update(1)
    finally:
        bar.close()
    return values
