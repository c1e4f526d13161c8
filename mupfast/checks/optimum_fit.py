"""Where is the optimum, and how does it move? The fits behind horizon-test and batch-test.

One curve's optimum is the vertex of a least-squares parabola in log2 of the gridded value (lr or
weight decay) near the best grid point. Across a scale axis (training tokens T, tokens per step B)
the optima are fitted by a straight line in log2–log2, weighted by each optimum's bootstrap σ over
seeds (each scale's seeds resampled independently; σ floored so one lucky point cannot take all the
weight). The slope's uncertainty is the larger of its bootstrap spread and the fit's standard error
scaled by √(χ²/dof). Pure functions: tests plant a slope in synthetic losses and recover it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mupfast.errors import ConfigError
from mupfast.tuning.launch import mean_loss


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


def fit_slope(
    losses: Any,
    log2_grid: Sequence[float],
    log2_axis: Sequence[float],
    *,
    n_boot: int = 2000,
    window: int = 2,
    min_sigma: float = 0.05,
    seed: int = 0,
    what: str = "fit",
    scales: str = "scales",
) -> dict[str, Any]:
    """The line log2 v* = c + slope·log2 x through the optima of ``losses[scale][grid value][seed]``
    (inf: diverged); ``what`` and ``scales`` name the fit and its axis in errors (``horizon fit``,
    ``horizons``).

    Returns the optima per scale (with their bootstrap σ in octaves), ``slope`` and its uncertainties
    (``sigma_boot``, ``sigma_fit``, ``sigma`` = the larger), ``c``, χ²/dof, the bootstrap replicates'
    slopes (``boot_slopes``) and ``drift``: how far the optimum moved from the first scale to the
    last, in octaves, with its bootstrap σ.
    """
    L = np.asarray(losses, dtype=float)
    H, _, S = L.shape
    if H < 3:
        raise ConfigError(f"{what}: needs at least 3 {scales} to fit an exponent (got {H})")
    optima = _optima(L, log2_grid, window)
    if any(o["log2_lr"] is None for o in optima):
        raise ConfigError(f"{what}: one of the {scales} has no optimum (every run diverged); widen the grid")
    est = np.array([o["log2_lr"] for o in optima])
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, H))
    for b in range(n_boot):
        idx = rng.integers(0, S, size=(H, S))  # each scale's seeds, resampled independently
        resampled = np.stack([L[h][:, idx[h]] for h in range(H)])
        boot[b] = [
            o["log2_lr"] if o["log2_lr"] is not None else np.nan
            for o in _optima(resampled, log2_grid, window)
        ]
    sigma_h = np.maximum(np.nanstd(boot, axis=0), min_sigma)
    x = np.asarray(log2_axis, dtype=float)
    line = weighted_line(x, est, sigma_h)
    whole = [row for row in boot if np.isfinite(row).all()]
    slopes = np.array([weighted_line(x, row, sigma_h)["slope"] for row in whole])
    sigma_boot = float(slopes.std(ddof=1)) if len(slopes) > 1 else math.nan
    dof = line["dof"]
    sigma_fit = line["slope_se"] * math.sqrt(max(1.0, line["chi2"] / dof)) if dof > 0 else math.nan
    drifts = np.array([row[-1] - row[0] for row in whole])
    return {
        "log2_axis": list(map(float, x)),
        "optima": [{**o, "sigma_log2": float(s)} for o, s in zip(optima, sigma_h)],
        "slope": line["slope"],
        "c": line["c"],
        "sigma_boot": sigma_boot,
        "sigma_fit": sigma_fit,
        "sigma": max(sigma_boot, sigma_fit),
        "chi2_per_dof": line["chi2"] / dof if dof > 0 else math.nan,
        "boot_slopes": slopes,
        "n_boot": int(len(slopes)),
        "any_at_edge": any(o["at_edge"] for o in optima),
        "drift": {
            "octaves": float(est[-1] - est[0]),
            "sigma": float(drifts.std(ddof=1)) if len(drifts) > 1 else math.nan,
            "axis_octaves": float(x[-1] - x[0]),
        },
    }


def exponent_fit(fit: dict[str, Any], *, sign: float, reference: float, name: str) -> dict[str, Any]:
    """A :func:`fit_slope` read as v* ∝ x^(sign·exponent): the exponent (``name`` too, e.g. alpha),
    its σ and percentiles, ``z`` against ``reference``, and the drift left after a rule with the
    reference exponent and with the fitted one (octaves: what the rule does not account for)."""
    exponent = sign * fit["slope"]
    slopes = fit.pop("boot_slopes")
    pct = (
        {str(q): float(np.percentile(sign * slopes, q)) for q in (2.5, 16, 50, 84, 97.5)}
        if len(slopes)
        else {}
    )
    d = fit["drift"]
    d["after_reference_rule"] = d["octaves"] - sign * reference * d["axis_octaves"]
    d["after_fitted_rule"] = d["octaves"] - sign * exponent * d["axis_octaves"]
    sigma = fit["sigma"]
    return {
        **fit,
        "exponent": exponent,
        name: exponent,
        f"{name}_boot_percentiles": pct,
        "reference": reference,
        "z": (exponent - reference) / sigma if sigma > 0 else math.inf,
    }
