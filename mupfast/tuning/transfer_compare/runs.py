"""The target runs of ``transfer-compare``: one grid point per seed, and the record of a config.

Shared by the study (:mod:`mupfast.tuning.transfer_compare.transfer_compare`) and its SP-grid extension
(:mod:`mupfast.tuning.transfer_compare.extend`), so both train and record a config the same way.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from mupfast import rundir
from mupfast.config import Config, with_overrides
from mupfast.model.flops import flops_per_token
from mupfast.tuning.launch import Point, grid_run_overrides, lr_tag, mean_loss


def run_flops(cfg: Config, steps: int | None = None) -> float:
    """Training FLOPs of one run of ``cfg`` over ``steps`` (default its train.steps)."""
    t = cfg.train
    return flops_per_token(cfg.model, t.seq_len) * t.tokens_per_step() * (t.steps if steps is None else steps)


def seed_points(cfg: Config, run_dir: Path, seeds: int, label: str, lr: float, first: int = 0) -> list[Point]:
    """One grid point per seed offset ``first … first + seeds - 1`` of ``cfg`` under ``run_dir/seed<s>``."""
    return [
        Point(
            label,
            cfg.model.hidden_size,
            lr,
            s,
            str(run_dir / f"seed{s}"),
            with_overrides(cfg, grid_run_overrides(cfg.train.seed + s, run_dir / f"seed{s}")),
        )
        for s in range(first, first + seeds)
    ]


def sp_key(std: float, lr: float) -> str:
    """An SP grid entry's key, which is also its run directory under ``runs/sp``."""
    return f"std{std:g}/lr{lr_tag(lr)}"


def sp_points(sp_target: Config, std: float, lr: float, sp_dir: Path, seeds: int) -> list[Point]:
    """SP's grid point (init std, lr): ``sp_target`` with them, one run per seed under ``sp_dir/<key>``."""
    cfg = with_overrides(sp_target, {"optim.lr": lr, "model.init_std": std})
    return seed_points(cfg, sp_dir / sp_key(std, lr), seeds, "sp", lr)


def seed_stats(per_seed: list[float]) -> dict[str, Any]:
    """Mean over seeds (inf if one diverged) and the sample std where there are two or more."""
    mean = mean_loss(per_seed)
    std = statistics.stdev(per_seed) if math.isfinite(mean) and len(per_seed) > 1 else None
    return {"per_seed": per_seed, "val_loss": mean, "seed_std": std}


def _speed(points: list[Point]) -> float | None:
    speeds = []
    for pt in points:
        try:
            speeds.append(float((rundir.read_summary(pt.run_dir) or {})["tokens_per_s"]))
        except (ValueError, KeyError, TypeError):
            pass
    return statistics.fmean(speeds) if speeds else None


def run_entry(points: list[Point], values: dict[str, float], **fields) -> dict[str, Any]:
    """One target config's record: ``fields``, its hyperparameters, per-seed losses, FLOPs, speed, run dirs."""
    cfg = points[0].cfg
    return {
        **fields,
        "lr": cfg.optim.lr,
        "init_std": cfg.model.init_std,
        **{
            k: getattr(cfg.model, k)
            for k in ("embeddings_scale", "output_logits_alpha", "attention_logits_alpha")
        },
        **seed_stats([values[pt.run_dir] for pt in points]),
        "runs": len(points),
        "flops": sum(run_flops(pt.cfg) for pt in points),
        "tokens_per_s": _speed(points),
        "run_dirs": [pt.run_dir for pt in points],
    }
