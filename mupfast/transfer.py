"""μTransfer test: does the best learning rate stay put as the model gets wider (or deeper)?

For each parametrization × width (or depth) × lr × seed, one real training run through the trainer
(``mupfast.train.train``: DeepSpeed engine, the embedded corpus, a run directory with
``metrics.jsonl`` and ``summary.json``); the point's value is the final validation loss. Per width
the optimum is the lr with the lowest val loss (mean over seeds); the *drift* is how far the optimum
moves across widths, in grid steps (max − min of its index on the lr grid). With a factor-2 grid,
μP should keep the drift ≤ 1 while SP's optimum moves to smaller lrs as the width grows (Tensor
Programs V, Figure 1). A quadratic fitted in log2 lr through the optimum and its two neighbours
gives a sub-grid estimate, reported beside the grid optimum.

Width scaling is the coordinate check's (:func:`mupfast.coord_check.scaled_config`): the head dim
and filter ratio stay fixed and ``mup_base_hidden_size`` is the smallest width. The depth variant
sweeps ``num_layers`` at the config's width with ``mup_base_num_layers`` the smallest depth
(typically ``mup`` against ``completep``).

HyperP (``hyperp``) has one lr from its transfer rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32, so its
grid (``hyperp_lrs``, default the common one) is over the base η0, with the smallest model's own
batch, depth and horizon as the base values: η = η0 at every width (the rule has no width term),
η = η0·√(d0/L) across depths. The test then asks whether η0's optimum stays put, i.e. whether the
rule's width and depth parts hold. The table and the picture are in :mod:`mupfast.transfer_plot`.

Runs go to ``<out>/runs/<parametrization>/<axis><size>/lr<lr>/seed<s>``; a point whose directory
already has a ``summary.json`` for the same config is not run again, so a killed sweep continues
where it stopped. A run that diverges (the trainer stops on non-finite losses, or ends with a
non-finite val loss) counts as +inf and is drawn as such. Independent runs go to ``jobs`` worker
processes (``spawn``), each with ``cpu_count // jobs`` torch threads and, on a GPU machine, its
own GPU (round robin over the visible ones; ``default_jobs`` is one per GPU).
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

from mupfast.config import Config, ConfigError, config_from_dict
from mupfast.coord_check import parse_parametrizations as coord_check_parametrizations
from mupfast.coord_check import scaled_config, with_overrides, write_result_files
from mupfast.transfer_plot import LABELS, plot_transfer, table_lines  # noqa: F401  (re-exported)


def hyperp_base_values(cfg: Config, *, axis: str, sizes: Sequence[int], steps: int) -> dict[str, Any]:
    """HyperP's base values for a transfer-test grid: the smallest model's own batch, depth and horizon.

    With them the rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32 gives η = η0 at the smallest size, so the
    grid over η0 is the grid of lrs the smallest model trains with; across widths η = η0 at every
    width (the rule has no width term: Muon on the sphere is meant to need none), across depths
    η = η0·√(d0/L).
    """
    t = cfg.train
    batch = t.seq_len * t.micro_batch_size * t.grad_accum_steps
    return {
        "optim.hyperp_base_batch_tokens": batch,
        "optim.hyperp_base_tokens": float(batch * steps),
        "model.hyperp_base_depth": min(sizes) if axis == "depth" else cfg.model.num_layers,
    }


def lr_grids(parametrizations: Sequence[str], lrs: Sequence[float], hyperp_lrs: Sequence[float] | None):
    """Parametrization → its lr grid: ``lrs`` for all, or ``hyperp_lrs`` (grid of η0) for hyperp."""
    return {p: list(hyperp_lrs if p == "hyperp" and hyperp_lrs else lrs) for p in parametrizations}


# ----------------------------------------------------------------------------------------------
# Flags


def parse_lrs(text: str, flag: str = "--lrs") -> list[float]:
    """``"2^-10,2^-9,1e-3"`` (or ``2**-10``) → sorted floats; a ConfigError naming the flag otherwise."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            if "^" in item or "**" in item:
                b, e = item.replace("**", "^").split("^")
                value = float(b) ** float(e)
            else:
                value = float(item)
        except ValueError:
            raise ConfigError(
                f"{flag}: {item!r} is not a number (expected e.g. 2^-10,2^-9 or 1e-3,2e-3)"
            ) from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{flag}: {item!r} is not a positive learning rate")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: values repeat ({text})")
    if len(values) < 2:
        raise ConfigError(f"{flag}: needs at least two learning rates (got {text!r})")
    return sorted(values)


PARAMETRIZATIONS = ("sp", "mup", "completep", "hyperp")


def parse_parametrizations(text: str, flag: str = "--parametrizations") -> list[str]:
    """``"mup,hyperp"`` → names; a ConfigError naming the flag for an unknown or repeated one."""
    return coord_check_parametrizations(text, flag, choices=PARAMETRIZATIONS)


# ----------------------------------------------------------------------------------------------
# Optimum finding (pure functions, tested on known curves)


def quadratic_vertex(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """x of the vertex of the parabola through three points, or None if it does not open upwards."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
    if not a > 0:
        return None
    return -b / (2 * a)


def find_optimum(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """The best lr of one curve: grid index, lr, log2 lr, and a quadratic sub-grid estimate.

    ``losses`` may hold inf/nan (diverged runs; never the optimum). ``fit_log2_lr`` is the vertex of
    the parabola in log2 lr through the optimum and its neighbours, clamped to their span, or the
    grid value when the optimum is at an edge of the grid (``at_edge``: the true optimum may lie
    outside it) or a neighbour diverged.
    """
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        return {
            "index": None,
            "lr": None,
            "log2_lr": None,
            "fit_log2_lr": None,
            "loss": None,
            "at_edge": False,
        }
    i = min(finite, key=lambda k: (losses[k], k))
    x = [math.log2(lr) for lr in lrs]
    fit = x[i]
    at_edge = i in (0, len(lrs) - 1)
    if not at_edge and math.isfinite(losses[i - 1]) and math.isfinite(losses[i + 1]):
        v = quadratic_vertex(x[i - 1 : i + 2], losses[i - 1 : i + 2])
        if v is not None:
            fit = min(max(v, x[i - 1]), x[i + 1])
    return {
        "index": i,
        "lr": lrs[i],
        "log2_lr": x[i],
        "fit_log2_lr": fit,
        "loss": losses[i],
        "at_edge": at_edge,
    }


def drift(optima: Sequence[dict]) -> dict[str, Any]:
    """How far the optimum moves across sizes: grid steps (max − min index) and log2 units of the fit."""
    idx = [o["index"] for o in optima]
    if any(i is None for i in idx):
        return {"grid_steps": None, "fit_log2": None, "indices": idx}
    fits = [o["fit_log2_lr"] for o in optima]
    return {"grid_steps": max(idx) - min(idx), "fit_log2": max(fits) - min(fits), "indices": idx}


def mean_loss(values: Sequence[float]) -> float:
    """Mean over seeds; inf if any seed diverged."""
    vals = [v if math.isfinite(v) else math.inf for v in values]
    return math.inf if any(math.isinf(v) for v in vals) else sum(vals) / len(vals)


# ----------------------------------------------------------------------------------------------
# Running the points


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


def make_points(
    cfg: Config,
    *,
    axis: str,
    sizes: Sequence[int],
    lrs: Sequence[float] | dict[str, Sequence[float]],
    seeds: int,
    parametrizations: Sequence[str],
    steps: int,
    out: Path,
) -> list[Point]:
    """Every (parametrization, size, lr, seed) run; ``lrs`` is one grid or a grid per parametrization.

    Under hyperp the lr of a point is the base η0 (``optim.hyperp_base_lr``) with the base values of
    :func:`hyperp_base_values`; ``optim.lr`` is set too but unused there.
    """
    grids = lrs if isinstance(lrs, dict) else {p: lrs for p in parametrizations}
    points = []
    for p in parametrizations:
        for size in sizes:
            if axis == "width":
                scaled = scaled_config(cfg, parametrization=p, width=size, base_width=min(sizes))
            else:
                scaled = scaled_config(cfg, parametrization=p, depth=size, base_depth=min(sizes))
            if p == "hyperp":
                scaled = with_overrides(scaled, hyperp_base_values(cfg, axis=axis, sizes=sizes, steps=steps))
            for lr in grids[p]:
                for s in range(seeds):
                    run_dir = out / "runs" / p / f"{axis}{size}" / f"lr{lr_tag(lr)}" / f"seed{s}"
                    point_cfg = with_overrides(
                        scaled,
                        {
                            "optim.lr": lr,
                            **({"optim.hyperp_base_lr": lr} if p == "hyperp" else {}),
                            "train.steps": steps,
                            **grid_run_overrides(cfg.train.seed + s, run_dir),
                        },
                    )
                    points.append(Point(p, size, lr, s, str(run_dir), point_cfg))
    return points


#: Config keys added with a default that differs from what runs made before them did.
_KEYS_THAT_CHANGED_BEHAVIOUR = [("model", "hyperp_readout_sphere")]


def finished_loss(point: Point) -> float | None:
    """The val loss of a point already run with the same config (inf if it diverged), else None."""
    run_dir = Path(point.run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    # Keys added to the config since the run was made compare at their defaults (config_from_dict),
    # except those whose default changed what runs made before them did.
    if any(key not in saved.get(section, {}) for section, key in _KEYS_THAT_CHANGED_BEHAVIOUR):
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
    from mupfast.train import TrainingError, train

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
            json.dumps({"final_val_loss": None, "status": status}, indent=2)
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

    from mupfast.engine import free_port

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


# ----------------------------------------------------------------------------------------------
# The whole test


def summarize(
    points: list[Point],
    values: dict[str, float],
    *,
    axis: str,
    sizes: Sequence[int],
    lrs: Sequence[float] | dict[str, Sequence[float]],
) -> dict[str, Any]:
    """Per parametrization and size: the val-loss curve over its lrs, its optimum; and the drift."""
    params = list(dict.fromkeys(pt.parametrization for pt in points))
    grids = lrs if isinstance(lrs, dict) else {p: lrs for p in params}
    by_key: dict[tuple, list[float]] = {}
    for pt in points:
        by_key.setdefault((pt.parametrization, pt.size, pt.lr), []).append(values[pt.run_dir])
    result: dict[str, Any] = {}
    for p in params:
        curves, lrs = {}, grids[p]
        for size in sizes:
            per_seed = [by_key[p, size, lr] for lr in lrs]
            losses = [mean_loss(v) for v in per_seed]
            curves[str(size)] = {
                "val_loss": losses,
                "val_loss_per_seed": per_seed,
                "optimum": find_optimum(lrs, losses),
            }
        result[p] = {
            "lrs": list(lrs),
            "log2_lrs": [math.log2(lr) for lr in lrs],
            "lr_is": "optim.hyperp_base_lr (η0)" if p == "hyperp" else "optim.lr",
            "curves": curves,
            "drift": drift([curves[str(s)]["optimum"] for s in sizes]),
        }
    return result


def default_parametrizations(axis: str) -> list[str]:
    """SP against μP across widths; μP against CompleteP across depths (hyperp on request)."""
    return ["sp", "mup"] if axis == "width" else ["mup", "completep"]


def transfer_test(
    cfg: Config,
    *,
    lrs: Sequence[float],
    hyperp_lrs: Sequence[float] | None = None,
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    steps: int | None = None,
    seeds: int = 1,
    parametrizations: Sequence[str] | None = None,
    out: str | Path = "runs/transfer-test",
    jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or finish) the sweep and return the result dict that ``transfer-test`` writes as JSON.

    ``hyperp_lrs``: the grid of η0 for hyperp (its lrs sit higher than AdamW's); default ``lrs``.
    """
    from mupfast.data import prepare_data

    if (widths is None) == (depths is None):
        raise ConfigError("transfer-test: give either --widths or --depths")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be positive (got {seeds})")
    axis = "width" if widths is not None else "depth"
    sizes = sorted(widths if widths is not None else depths)
    if parametrizations is None:
        parametrizations = default_parametrizations(axis)
    steps = steps or cfg.train.steps
    if steps < 1:
        raise ConfigError(f"--steps: must be positive (got {steps})")
    out = Path(out)
    points = make_points(
        cfg,
        axis=axis,
        sizes=sizes,
        lrs=lr_grids(parametrizations, lrs, hyperp_lrs),
        seeds=seeds,
        parametrizations=parametrizations,
        steps=steps,
        out=out,
    )
    prepare_data(cfg.data, progress=progress)  # once, before the workers start
    t0 = time.perf_counter()
    values = run_points(points, jobs=jobs, progress=progress)
    t = points[0].cfg.train
    return {
        "axis": axis,
        "sizes": sizes,
        "lrs": list(lrs),
        "log2_lrs": [math.log2(lr) for lr in lrs],
        "hyperp_lrs": list(hyperp_lrs) if hyperp_lrs and "hyperp" in parametrizations else None,
        "steps": steps,
        "seeds": seeds,
        "tokens_per_step": t.seq_len * t.micro_batch_size * t.grad_accum_steps,
        "parametrizations": list(parametrizations),
        "fixed": {
            "width": cfg.model.hidden_size if axis == "depth" else None,
            "num_layers": cfg.model.num_layers if axis == "width" else None,
            "head_dim": cfg.model.head_dim,
            "base_size": sizes[0],
        },
        "results": summarize(
            points, values, axis=axis, sizes=sizes, lrs=lr_grids(parametrizations, lrs, hyperp_lrs)
        ),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }


# ----------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict, out: str | Path, name: str = "transfer_test") -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` into ``out``; return their paths."""
    return write_result_files(result, out, name, plot_transfer)
