"""Parsers of the verbs' list-valued flags (``--widths 64,128``, ``--lrs 2^-10,2^-9``).

Each returns the parsed value or raises a :class:`~mupfast.errors.ConfigError` that names the flag,
so a typo is one ``error: …`` line at the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mupfast.config import PARAMETRIZATIONS
from mupfast.errors import ConfigError


def parse_positive_int(text: str | int, flag: str, *, zero_ok: bool = False) -> int:
    """An integer > 0 (≥ 0 with ``zero_ok``); ConfigError naming the flag."""
    what = "a non-negative integer" if zero_ok else "a positive integer"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: {text!r} is not {what}") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{flag}: {text!r} is not {what}")
    return value


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"64,128,256"`` → ``[64, 128, 256]``: positive, distinct, sorted; ConfigError naming the flag."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ConfigError(
                f"{flag}: {item!r} is not a positive integer (expected e.g. 64,128,256)"
            ) from None
        if value <= 0:
            raise ConfigError(f"{flag}: {item!r} is not a positive integer (expected e.g. 64,128,256)")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: values repeat ({text})")
    if len(values) < 2:
        raise ConfigError(f"{flag}: needs at least two values to compare (got {text!r})")
    return sorted(values)


def parse_float_list(text: str, flag: str, *, positive: bool = True) -> list[float]:
    """``"0.02,0.05"`` → sorted distinct floats; a ConfigError naming the flag otherwise."""
    values = []
    for item in str(text).split(","):
        try:
            v = float(item.strip())
        except ValueError:
            raise ConfigError(f"{flag}: {item.strip()!r} is not a number") from None
        if not math.isfinite(v) or (positive and v <= 0):
            raise ConfigError(f"{flag}: {item.strip()!r} is not a positive number")
        values.append(v)
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: values repeat ({text})")
    return sorted(values)


def parse_parametrizations(
    text: str, flag: str = "--parametrizations", choices: Sequence[str] = PARAMETRIZATIONS
) -> list[str]:
    """``"sp,mup"`` → names; a ConfigError naming the flag for an unknown or repeated one."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise ConfigError(f"{flag}: {', '.join(bad) or repr(text)} — choose from {', '.join(choices)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag}: values repeat ({text})")
    return names


def parse_lr(text: str, flag: str) -> float:
    """``"2^-10"`` (or ``2**-10``, ``1e-3``) → a positive float; a ConfigError naming the flag otherwise."""
    item = str(text).strip()
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
    return value


def parse_lrs(text: str, flag: str = "--lrs") -> list[float]:
    """``"2^-10,2^-9,1e-3"`` → sorted floats (at least two, none repeated); a ConfigError otherwise."""
    values = [parse_lr(item, flag) for item in str(text).split(",")]
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag}: values repeat ({text})")
    if len(values) < 2:
        raise ConfigError(f"{flag}: needs at least two learning rates (got {text!r})")
    return sorted(values)
