"""Token-horizon check: how does the best learning rate move with the number of training tokens T?

HyperP's transfer rule says η* ∝ T^-0.32 (microsoft/ArchScale's HyperP recipe). For a fixed model
this module trains an lr grid at several horizons (``train.steps``; T = steps · tokens per step)
through :func:`mupfast.tuning.launch.run_points`, finds the optimum at each horizon (a parabola in
log2 lr near the best grid point) and fits

    log2 η*(T) = c − α · log2 T

weighted by each optimum's bootstrap σ over seeds, to report α with its uncertainty next to 0.32.
How the runs are set up and how σ is found: docs/hyperp.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mupfast.checks.horizon_plot import plot_horizon, summary_lines
from mupfast.checks.results import write_result_files
from mupfast.config import PARAMETRIZATIONS, Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_int_list, parse_lrs, parse_positive_int
from mupfast.parametrization import hyperp_own_bases
from mupfast.tuning.launch import Point, grid_run_dir, grid_run_overrides, mean_loss, run_points

#: HyperP's token-horizon exponent, as a positive α in η* ∝ T^-α.
REFERENCE_ALPHA = 0.32


# ----------------------------------------------------------------------------------------------
# Fitting (pure functions, tested on synthetic curves with a known exponent)


def parabola_optimum(log2_lrs: Sequence[float], losses: Sequence[float], window: int = 2) -> dict[str, Any]:
    """The optimum of one loss curve: vertex of a least-squares parabola near the best grid point.

    Returns ``log2_lr`` (the vertex, clamped to the fitted span; the grid point where no parabola
    opening upwards fits), ``grid_log2_lr``, ``loss`` (the best grid loss), ``at_edge`` and
    ``fitted`` (False: the grid point was used).
    """
    x = np.asarray(log2_lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    finite = np.isfinite(y)
    if not finite.any():
        return {"log2_lr": None, "grid_log2_lr": None, "loss": None, "at_edge": False, "fitted": False}
    i = int(np.argmin(np.where(finite, y, np.inf)))
    out = {
        "log2_lr": float(x[i]),
        "grid_log2_lr": float(x[i]),
        "loss": float(y[i]),
        "at_edge": i in (0, len(x) - 1),
        "fitted": False,
    }
    near = [j for j in range(max(0, i - window), min(len(x), i + window + 1)) if finite[j]]
    if len(near) >= 3:
        a, b, _ = np.polyfit(x[near], y[near], 2)
        if a > 0:
            out["log2_lr"] = float(min(max(-b / (2 * a), x[near].min()), x[near].max()))
            out["fitted"] = True
    return out


def weighted_line(x: Sequence[float], y: Sequence[float], sigma: Sequence[float]) -> dict[str, float]:
    """Weighted least squares y = c + slope·x with weights 1/σ²: slope, c, their standard errors, χ²."""
    x, y, s = (np.asarray(v, dtype=float) for v in (x, y, sigma))
    w = 1.0 / s**2
    W, Wx, Wy = w.sum(), (w * x).sum(), (w * y).sum()
    Wxx, Wxy = (w * x * x).sum(), (w * x * y).sum()
    det = W * Wxx - Wx * Wx
    slope = (W * Wxy - Wx * Wy) / det
    c = (Wxx * Wy - Wx * Wxy) / det
    chi2 = float((w * (y - c - slope * x) ** 2).sum())
    return {
        "slope": float(slope),
        "c": float(c),
        "slope_se": float(math.sqrt(W / det)),
        "c_se": float(math.sqrt(Wxx / det)),
        "chi2": chi2,
        "dof": len(x) - 2,
    }


def _optima(losses: np.ndarray, log2_lrs: Sequence[float], window: int) -> list[dict]:
    """Per horizon, the optimum of the seed-mean curve (``losses``: horizon × lr × seed)."""
    return [
        parabola_optimum(log2_lrs, [mean_loss(list(losses[h, j])) for j in range(losses.shape[1])], window)
        for h in range(losses.shape[0])
    ]


def fit_horizon(
    losses: Any,
    log2_lrs: Sequence[float],
    log2_tokens: Sequence[float],
    *,
    n_boot: int = 2000,
    window: int = 2,
    min_sigma: float = 0.05,
    seed: int = 0,
    reference: float = REFERENCE_ALPHA,
) -> dict[str, Any]:
    """α of log2 η* = c − α·log2 T from val losses ``losses[horizon][lr][seed]`` (inf: diverged).

    Returns the optima per horizon (with their bootstrap σ in octaves), ``alpha`` and its
    uncertainties (``sigma_boot``, ``sigma_fit``, ``sigma`` = the larger), χ²/dof, the bootstrap
    replicates' α percentiles, and ``z`` = (α − reference)/σ.
    """
    L = np.asarray(losses, dtype=float)
    H, _, S = L.shape
    if H < 3:
        raise ConfigError(f"horizon fit: needs at least 3 horizons (got {H})")
    optima = _optima(L, log2_lrs, window)
    if any(o["log2_lr"] is None for o in optima):
        raise ConfigError("horizon fit: a horizon where every lr diverged has no optimum; widen --lrs")
    est = np.array([o["log2_lr"] for o in optima])
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, H))
    for b in range(n_boot):
        idx = rng.integers(0, S, size=(H, S))  # each horizon's seeds, resampled independently
        resampled = np.stack([L[h][:, idx[h]] for h in range(H)])
        boot[b] = [
            o["log2_lr"] if o["log2_lr"] is not None else np.nan for o in _optima(resampled, log2_lrs, window)
        ]
    sigma_h = np.maximum(np.nanstd(boot, axis=0), min_sigma)
    x = np.asarray(log2_tokens, dtype=float)
    line = weighted_line(x, est, sigma_h)
    alphas = np.array([-weighted_line(x, row, sigma_h)["slope"] for row in boot if np.isfinite(row).all()])
    alpha = -line["slope"]
    sigma_boot = float(alphas.std(ddof=1)) if len(alphas) > 1 else math.nan
    sigma_fit = (
        line["slope_se"] * math.sqrt(max(1.0, line["chi2"] / line["dof"])) if line["dof"] > 0 else math.nan
    )
    sigma = max(sigma_boot, sigma_fit)
    return {
        "log2_tokens": list(map(float, x)),
        "optima": [{**o, "sigma_log2": float(s)} for o, s in zip(optima, sigma_h)],
        "alpha": alpha,
        "c": line["c"],
        "sigma_boot": sigma_boot,
        "sigma_fit": sigma_fit,
        "sigma": sigma,
        "chi2_per_dof": line["chi2"] / line["dof"] if line["dof"] > 0 else math.nan,
        "alpha_boot_percentiles": {str(q): float(np.percentile(alphas, q)) for q in (2.5, 16, 50, 84, 97.5)}
        if len(alphas)
        else {},
        "n_boot": int(len(alphas)),
        "any_at_edge": any(o["at_edge"] for o in optima),
        "reference": reference,
        "z": (alpha - reference) / sigma if sigma > 0 else math.inf,
    }


# ----------------------------------------------------------------------------------------------
# The runs


def horizon_config(cfg: Config, *, parametrization: str, steps: int, lr: float) -> Config:
    """``cfg`` trained for ``steps`` at lr ``lr``; the warmup the same fraction of training.

    Under hyperp the base values are the model's own B, L and this T, so η = η0 = ``lr``.
    """
    t, sch = cfg.train, cfg.schedule
    values: dict[str, Any] = {
        "model.parametrization": parametrization,
        "train.steps": steps,
        "schedule.warmup_steps": round(sch.warmup_steps * steps / t.steps),
        "optim.lr": lr,
    }
    if parametrization == "hyperp":
        values.update(hyperp_own_bases(cfg, lr, steps=steps))
    return with_overrides(cfg, values)


def make_points(
    cfg: Config,
    *,
    horizons: Sequence[int],
    lrs: Sequence[float],
    seeds: int,
    parametrization: str,
    out: Path,
) -> list[Point]:
    """One point per (horizon, lr, seed) under ``out/runs/<parametrization>/steps<S>/lr<lr>/seed<s>``."""
    points = []
    for steps in horizons:
        for lr in lrs:
            base = horizon_config(cfg, parametrization=parametrization, steps=steps, lr=lr)
            for s in range(seeds):
                run_dir = grid_run_dir(out, parametrization, "steps", steps, lr, s)
                point_cfg = with_overrides(base, grid_run_overrides(cfg.train.seed + s, run_dir))
                points.append(Point(parametrization, steps, lr, s, str(run_dir), point_cfg))
    return points


def horizon_test(
    cfg: Config,
    *,
    horizons: Sequence[int],
    lrs: Sequence[float],
    seeds: int = 3,
    parametrization: str = "hyperp",
    out: str | Path = "runs/horizon-test",
    jobs: int = 1,
    progress: bool = True,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Run (or finish) the grid and fit α; returns the dict ``horizon-test`` writes as JSON."""
    from mupfast.data import prepare_sources

    horizons = sorted(horizons)
    if len(horizons) < 3:
        raise ConfigError(f"--steps: needs at least 3 horizons to fit an exponent (got {len(horizons)})")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be positive (got {seeds})")
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(
            f"--parametrization: {parametrization!r} — choose from {', '.join(PARAMETRIZATIONS)}"
        )
    out = Path(out)
    points = make_points(
        cfg, horizons=horizons, lrs=lrs, seeds=seeds, parametrization=parametrization, out=out
    )
    prepare_sources(cfg.data, progress=progress)
    t0 = time.perf_counter()
    values = run_points(points, jobs=jobs, progress=progress, desc="horizon-test")
    by_key = {(pt.size, pt.lr, pt.seed): values[pt.run_dir] for pt in points}
    losses = [[[by_key[h, lr, s] for s in range(seeds)] for lr in lrs] for h in horizons]
    t = cfg.train
    batch = t.tokens_per_step()
    tokens = [h * batch for h in horizons]
    log2_lrs = [math.log2(lr) for lr in lrs]
    fit = fit_horizon(losses, log2_lrs, [math.log2(x) for x in tokens], n_boot=n_boot)
    best = []
    for h, curve in zip(horizons, losses):
        means = [mean_loss(v) for v in curve]
        j = min(range(len(lrs)), key=lambda k: means[k])
        per_seed = curve[j]
        best.append(
            {
                "steps": h,
                "lr": lrs[j],
                "val_loss": means[j],
                "val_loss_per_seed": per_seed,
                "seed_std": float(np.std(per_seed, ddof=1)) if seeds > 1 else None,
            }
        )
    m = cfg.model
    return {
        "parametrization": parametrization,
        "horizons_steps": horizons,
        "tokens": tokens,
        "tokens_per_step": batch,
        "lrs": list(lrs),
        "log2_lrs": log2_lrs,
        "seeds": seeds,
        "model": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "head_dim": m.head_dim},
        "warmup_fraction": cfg.schedule.warmup_steps / t.steps,
        "schedule": cfg.schedule.kind,
        "val_loss": losses,
        "fit": fit,
        "best": best,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
        "base_config": cfg.to_dict(),  # what the grid scaled from, overrides included
    }


# ----------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict, out: str | Path, name: str = "horizon_test") -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.png`` into ``out``; return their paths."""
    return write_result_files(result, out, name, plot_horizon)


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default="100,200,400,800", help="horizons in steps (default %(default)s)")
    parser.add_argument(
        "--lrs",
        default="2^-6,2^-5.5,2^-5,2^-4.5,2^-4,2^-3.5,2^-3",
        help="lr grid; under hyperp η0 = η (default %(default)s)",
    )
    parser.add_argument("--seeds", default="3", help="seeds per point (default %(default)s)")
    parser.add_argument("--parametrization", default="hyperp", help="default %(default)s")
    parser.add_argument(
        "--bootstrap", default="2000", help="bootstrap replicates over seeds (default %(default)s)"
    )
    parser.add_argument("--jobs", default="1", help="parallel runs (default %(default)s)")
    parser.add_argument("--out", default="runs/horizon-test", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The ``horizon-test`` verb: train the grid, fit α, print it, write the JSON and the picture."""
    result = horizon_test(
        load_config(args.config, args.overrides),
        horizons=parse_int_list(args.steps, "--steps"),
        lrs=parse_lrs(args.lrs),
        seeds=parse_positive_int(args.seeds, "--seeds"),
        parametrization=args.parametrization,
        out=args.out,
        jobs=parse_positive_int(args.jobs, "--jobs"),
        n_boot=parse_positive_int(args.bootstrap, "--bootstrap"),
    )
    js, png = write_outputs(result, args.out)
    print("\n".join(summary_lines(result)))
    print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
    return 0
