"""A grid of training runs over a scale axis and a hyperparameter: what horizon-test and batch-test share.

At every scale (training steps, or tokens per step) the grid trains one run per value of the gridded
hyperparameter (the lr, or the weight decay at a fixed lr) and seed, through
:func:`mupfast.tuning.launch.run_points` (finished points reused, diverged ones +inf). The runs train
at the value they name: the config's own batch and horizon are its base (optim.base_batch_tokens and
base_tokens 0), so the AdamW rule across batch and horizon does not move them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mupfast.config import PARAMETRIZATIONS, Config, with_overrides
from mupfast.errors import ConfigError
from mupfast.parametrization import hyperp_own_bases
from mupfast.tuning.launch import Point, grid_run_dir, grid_run_overrides, mean_loss, run_points

#: What a grid may vary at each scale: the config key it sets, and the run directory's name for it.
GRIDS = {"lr": ("optim.lr", "lr"), "weight_decay": ("optim.weight_decay", "wd")}


@dataclass(frozen=True)
class ScaleGrid:
    """The runs of one check: ``scales`` along ``axis`` (``steps`` or ``batch``), ``values`` of ``grid``."""

    axis: str
    scales: Sequence[int]
    grid: str
    values: Sequence[float]
    seeds: int
    parametrization: str


def check_grid(g: ScaleGrid, scales_flag: str, scales_noun: str) -> None:
    """One-line errors for a grid that cannot give a fit."""
    if len(g.scales) < 3:
        raise ConfigError(
            f"{scales_flag}: needs at least 3 {scales_noun} to fit an exponent (got {len(g.scales)})"
        )
    if g.seeds < 1:
        raise ConfigError(f"--seeds: must be positive (got {g.seeds})")
    if g.parametrization not in PARAMETRIZATIONS:
        raise ConfigError(
            f"--parametrization: {g.parametrization!r} — choose from {', '.join(PARAMETRIZATIONS)}"
        )
    if g.grid not in GRIDS:
        raise ConfigError(f"--grid: {g.grid!r} — choose from {', '.join(GRIDS)}")
    if g.grid == "weight_decay" and g.parametrization == "hyperp":
        raise ConfigError(
            "--grid: weight_decay is for the AdamW parametrizations (hyperp's matrices have none)"
        )


def point_config(cfg: Config, g: ScaleGrid, value: float, fixed_lr: float | None) -> Config:
    """``cfg`` (already at its scale) with the grid's value set; it trains at the lr it names."""
    key, _ = GRIDS[g.grid]
    lr = value if g.grid == "lr" else (fixed_lr if fixed_lr is not None else cfg.optim.lr)
    values: dict[str, Any] = {"model.parametrization": g.parametrization, key: value, "optim.lr": lr}
    if g.parametrization == "hyperp":
        values.update(hyperp_own_bases(cfg, lr))
    else:
        values.update({"optim.base_batch_tokens": 0, "optim.base_tokens": 0.0})
    return with_overrides(cfg, values)


def run_grid(
    g: ScaleGrid,
    at_scale: Callable[[int], Config],
    *,
    out: Path,
    fixed_lr: float | None,
    jobs: int,
    progress: bool,
    desc: str,
) -> list[list[list[float]]]:
    """Train (or finish) the grid; val losses ``[scale][value][seed]`` (inf: diverged)."""
    _, tag = GRIDS[g.grid]
    points = []
    for scale in g.scales:
        scaled = at_scale(scale)
        for value in g.values:
            base = point_config(scaled, g, value, fixed_lr)
            for s in range(g.seeds):
                run_dir = grid_run_dir(out, g.parametrization, g.axis, scale, value, s, value=tag)
                point_cfg = with_overrides(base, grid_run_overrides(scaled.train.seed + s, run_dir))
                points.append(Point(g.parametrization, scale, value, s, str(run_dir), point_cfg))
    losses = run_points(points, jobs=jobs, progress=progress, desc=desc)
    by_key = {(pt.size, pt.lr, pt.seed): losses[pt.run_dir] for pt in points}
    return [[[by_key[h, v, s] for s in range(g.seeds)] for v in g.values] for h in g.scales]


def best_per_scale(g: ScaleGrid, losses: list) -> list[dict[str, Any]]:
    """Per scale, the grid value with the lowest mean val loss, its per-seed losses and their spread."""
    best = []
    for scale, curve in zip(g.scales, losses):
        means = [mean_loss(v) for v in curve]
        j = min(range(len(g.values)), key=lambda k: means[k])
        per_seed = curve[j]
        best.append(
            {
                g.axis: scale,
                g.grid: g.values[j],
                "val_loss": means[j],
                "val_loss_per_seed": per_seed,
                "seed_std": float(np.std(per_seed, ddof=1)) if g.seeds > 1 else None,
            }
        )
    return best


def grid_record(g: ScaleGrid, cfg: Config, losses: list) -> dict[str, Any]:
    """What every scale-grid result holds about its grid (the check adds its axis and fit)."""
    m = cfg.model
    return {
        "parametrization": g.parametrization,
        "grid": g.grid,
        "grid_values": list(g.values),
        "log2_grid_values": [math.log2(v) for v in g.values],
        "seeds": g.seeds,
        "model": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "head_dim": m.head_dim},
        "warmup_fraction": cfg.schedule.warmup_steps / cfg.train.steps,
        "schedule": cfg.schedule.kind,
        "val_loss": losses,
        "best": best_per_scale(g, losses),
        "base_config": cfg.to_dict(),  # what the grid scaled from, overrides included
    }
