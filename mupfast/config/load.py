"""Building a :class:`~mupfast.config.schema.Config`: YAML files, dotted overrides, type checks.

``load_config(path, overrides)`` reads a YAML file (``yaml.safe_load``), applies overrides such as
``optim.lr=3e-3``, checks every key and type (here) and the cross-field rules
(:mod:`mupfast.config.validate`), and returns a :class:`~mupfast.config.schema.Config`. The sections
installed features register (``finetune``, :func:`mupfast.plugins.feature_sections`) are read like
the core ones. Every problem is a :class:`ConfigError` naming the key, which the CLI prints as one
``error: …`` line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mupfast.config import foreign_keys
from mupfast.config.schema import Config
from mupfast.config.validate import validate
from mupfast.errors import ConfigError
from mupfast.plugins import feature_sections


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides."""
    cfg = config_from_dict(read_raw_config(path, overrides))
    validate(cfg)
    return cfg


def read_raw_config(
    path: str | Path | None, overrides: typing.Sequence[str] = (), what: str = "config file"
) -> dict:
    """The YAML mapping of a config file (empty when path is None) with dotted overrides applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_file(Path(path), what) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return raw


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's content; a missing file or bad YAML is a one-line error naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. optim.lr=3e-3")
    _set_dotted(raw, key, yaml.safe_load(value) if value.strip() else None, f"override {item!r}")


def _set_dotted(raw: dict[str, Any], key: str, value: Any, what: str) -> None:
    """``raw[a][b]… = value`` for the dotted ``key``, making sections that are not there yet."""
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {p} is not a section")
    node[leaf] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A :class:`Config` from its mapping: the core sections and every registered feature's, each
    with its defaults where the mapping leaves it out (types checked, not the cross-field rules)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(Config)
    kinds = {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "sections"}
    kinds.update(feature_sections())
    _check_keys(raw, list(kinds), prefix="")
    return Config(**{key: _build(cls, raw.get(key) or {}, f"{key}.") for key, cls in kinds.items()})


def with_overrides(cfg: Config, values: dict[str, Any], *, check: bool = True) -> Config:
    """A copy of ``cfg`` with dotted keys replaced (``{"model.hidden_size": 256}``).

    The copy is checked like a loaded config unless ``check`` is false (a step inside a larger
    change that is checked as a whole).
    """
    raw = cfg.to_dict()
    for key, value in values.items():
        _set_dotted(raw, key, value, key)
    new = config_from_dict(raw)
    if check:
        validate(new)
    return new


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    _check_keys(raw, [f.name for f in dataclasses.fields(cls)], prefix)
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _check_keys(raw: dict[str, Any], names: list[str], prefix: str) -> None:
    """Every key of ``raw`` must be one of ``names``: the error for one that is not suggests the closest."""
    for key in raw:
        if key not in names:
            hint = foreign_keys.hint(str(key))  # by meaning, not spelling (foreign_keys' docstring)
            if hint is None:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"valid: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}: unknown key ({hint})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert where it is unambiguous (YAML reads 3e-3 as a string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        return _coerce(value, inner[-1], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (got {value!r})")
        if dataclasses.is_dataclass(args[0]):
            return [_build(args[0], v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (got {value!r})")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number (got {value!r})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string (got {value!r})")
    return value
