"""Exponents measured on the proxy, for ``mupfast transfer --horizon-fit FILE --batch-fit FILE``.

A horizon-test result (lr grid) gives α of η* ∝ T^-α, a batch-test result β of η* ∝ B^β; the AdamW
rule across batch and horizon then uses them in place of optim.horizon_lr_exponent and
optim.batch_lr_exponent. Every problem with a file is one line naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mupfast.config import Config
from mupfast.errors import ConfigError

#: flag → (the check that writes such a file, the exponent's key in its fit, the config key it sets)
KINDS = {
    "--horizon-fit": ("horizon-test", "alpha", "optim.horizon_lr_exponent"),
    "--batch-fit": ("batch-test", "beta", "optim.batch_lr_exponent"),
}


def _check_of(result: dict) -> str | None:
    """Which check wrote a result (files from before the key existed: by their fields)."""
    if "check" in result:
        return result["check"]
    return "horizon-test" if "horizons_steps" in result else None


def read_exponent_fit(path: str | Path, flag: str, proxy: Config) -> dict[str, Any]:
    """``{"exponent", "sigma", "file", "key"}`` from a check's result file; one line naming it otherwise."""
    check, name, key = KINDS[flag]
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: {path}: not a JSON result file ({e})") from None
    if not isinstance(result, dict) or _check_of(result) != check:
        raise ConfigError(f"{flag}: {path}: not a `mupfast {check}` result")
    if result.get("grid", "lr") != "lr":
        raise ConfigError(f"{flag}: {path}: a {result['grid']} grid; the lr exponent needs an lr grid")
    p = proxy.model.parametrization
    if p == "hyperp":
        raise ConfigError(f"{flag}: {path}: the proxy is hyperp, whose rule fixes its own exponents")
    if result.get("parametrization") != p:
        raise ConfigError(
            f"{flag}: {path}: measured under {result.get('parametrization')}, the proxy is {p}; "
            f"run `mupfast {check} --parametrization {p}`"
        )
    fit = result.get("fit") or {}
    exponent, sigma = fit.get(name), fit.get("sigma")
    optima = [o for o in fit.get("optima", []) if o.get("log2_lr") is not None]
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (exponent, sigma))
    if not finite or len(optima) < 3:
        raise ConfigError(
            f"{flag}: {path}: the fit failed (no finite exponent from at least 3 optima: too few points, "
            "or every lr diverged somewhere); widen the grid and run it again"
        )
    return {"exponent": float(exponent), "sigma": float(sigma), "file": str(path), "key": key}


def exponents_from(horizon_fit: str | None, batch_fit: str | None, proxy: Config) -> tuple[dict, list[str]]:
    """The fitted exponents for transfer_to ({"horizon": α, "batch": β}), and one line per
    exponent saying where it came from (fitted, or the target config's own)."""
    exponents, lines = {}, []
    for flag, path, rule_key in (
        ("--horizon-fit", horizon_fit, "horizon"),
        ("--batch-fit", batch_fit, "batch"),
    ):
        symbol = "α" if rule_key == "horizon" else "β"
        if path is None:
            lines.append(f"{symbol}: the target config's {KINDS[flag][2]} ({flag} not given)")
            continue
        fit = read_exponent_fit(path, flag, proxy)
        exponents[rule_key] = fit["exponent"]
        lines.append(
            f"{symbol} = {fit['exponent']:.3f} ± {fit['sigma']:.3f}, fitted on the proxy ({fit['file']})"
        )
    return exponents, lines
