"""The search space of a proxy sweep: which hyperparameters it samples and over which ranges.

A space file maps μTransferable hyperparameter names (lr, init std, embeddings_scale,
output_logits_alpha, attention_logits_alpha) to ``{low, high, log}`` ranges; :data:`SPACE_KEYS`
says which config key each name sets and :data:`DEFAULT_SPACE` holds the built-in ranges.
Every mistake in a space file is a :class:`~mupfast.config.ConfigError` naming the bad key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.config.load import read_yaml_file
from mupfast.errors import ConfigError

#: Space names → the config keys they set (the Cerebras μP names live in the model section).
SPACE_KEYS = {
    "lr": "optim.lr",
    "init_std": "model.init_std",
    "embeddings_scale": "model.embeddings_scale",
    "output_logits_alpha": "model.output_logits_alpha",
    "attention_logits_alpha": "model.attention_logits_alpha",
}


def space_key(name: str, cfg) -> str:
    """The config key a space name sets in ``cfg``: ``lr`` is hyperp's η0 (optim.lr is unused there)."""
    if name == "lr" and cfg.model.parametrization == "hyperp":
        return "optim.hyperp_base_lr"
    return SPACE_KEYS[name]


#: The built-in space (configs/sweep-space.yaml holds the same ranges).
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "init_std": {"low": 0.01, "high": 0.2, "log": True},
    "embeddings_scale": {"low": 1.0, "high": 30.0, "log": True},
    "output_logits_alpha": {"low": 0.1, "high": 10.0, "log": True},
    "attention_logits_alpha": {"low": 0.1, "high": 10.0, "log": True},
}


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = True


def parse_space(raw: Any, where: str = "space") -> dict[str, Range]:
    """``{name: {low, high, log}}`` → ranges; a ConfigError naming the bad key otherwise."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of hyperparameters, e.g. lr: {{low: 1e-4, high: 1e-1}}"
        )
    space = {}
    for name, spec in raw.items():
        key = f"{where}: {name}"
        if name not in SPACE_KEYS:
            import difflib

            close = difflib.get_close_matches(str(name), SPACE_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(SPACE_KEYS)}"
            raise ConfigError(f"{key}: unknown hyperparameter ({hint})")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected {{low: …, high: …, log: true}} (got {spec!r})")
        unknown = set(spec) - {"low", "high", "log"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown field (valid: low, high, log)")
        values = {}
        for field in ("low", "high"):
            v = spec.get(field)
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{key}.{field}: expected a number (got {v!r})")
            values[field] = float(v)
        log = spec.get("log", True)
        if not isinstance(log, bool):
            raise ConfigError(f"{key}.log: expected true or false (got {log!r})")
        if values["low"] >= values["high"]:
            raise ConfigError(f"{key}: low ({values['low']:g}) must be below high ({values['high']:g})")
        if values["low"] <= 0:
            raise ConfigError(f"{key}.low: must be positive (got {values['low']:g})")
        space[name] = Range(values["low"], values["high"], log)
    return space


#: Space names hyperp has no use for: its hidden init is fixed by fan-in (1/√(3·fan_in)) and its
#: attention scale is 1/√d_head, so sampling them would spend trials on dimensions with no effect.
HYPERP_UNUSED = frozenset({"init_std", "attention_logits_alpha"})


def load_space(path: str | Path | None, cfg=None) -> dict[str, Range]:
    """The space file's ranges, or the built-in ones when ``path`` is None.

    With a hyperp proxy ``cfg`` the built-in space leaves out :data:`HYPERP_UNUSED`, and a file that
    names one of them is an error.
    """
    hyperp = cfg is not None and cfg.model.parametrization == "hyperp"
    if path is None:
        return parse_space({k: v for k, v in DEFAULT_SPACE.items() if not (hyperp and k in HYPERP_UNUSED)})
    space = _load_space_file(Path(path))
    unused = sorted(HYPERP_UNUSED & set(space)) if hyperp else []
    if unused:
        raise ConfigError(
            f"{path}: {unused[0]}: hyperp does not use it (hidden init 1/√(3·fan_in), attention "
            "1/√d_head); leave it out of the space"
        )
    return space


def _load_space_file(path: Path) -> dict[str, Range]:
    return parse_space(read_yaml_file(path, "--space: file"), str(path))


def space_dict(space: dict[str, Range]) -> dict[str, dict[str, Any]]:
    return {k: {"low": r.low, "high": r.high, "log": r.log} for k, r in space.items()}
