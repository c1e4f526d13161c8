"""Features plug into the core one way: through the hooks defined here, never by being imported.

A feature (fine-tuning is one) is an object listed under the entry-point group ``mupfast.features``
in pyproject.toml. The core finds them there and calls them at a few fixed points; no core module
imports a feature's package (tests/test_architecture.py holds that). What a feature may bring:

* a config section of its own, registered with its checks (``Feature.section``, ``Feature.check``);
* a change to a freshly built model (``prepare_model``: fine-tuning loads the base run's weights and
  attaches adapters), returning the :class:`TrainerHooks` the training loop calls;
* a step before export (``export_model``: adapters merged into the weights), and its own parts
  written alone (``export_adapters``: ``mupfast export --adapters-only``).

The rules table needs no hook: a module a feature adds states the μP rules of its own parameters
(:class:`mupfast.parametrization.StatesOwnRules`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from mupfast.config.schema import Config

ENTRY_POINT_GROUP = "mupfast.features"


class TrainerHooks:
    """The training loop's calls into a feature; each is a no-op unless a feature needs it.

    ``samplers`` may wrap the batch samplers once, at setup; ``before_step(skip)`` runs after the last
    backward of a step (full gradients, any ZeRO stage; ``skip`` is the step's device flag for a
    non-finite loss), ``after_step(step)`` after the optimizer step, ``metrics()`` on logging steps.
    """

    def samplers(self, train_sampler, val_sampler):
        return train_sampler, val_sampler

    def before_step(self, skip=None) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class Feature:
    """What a feature offers the core; every method has a do-nothing default."""

    name: str = ""
    """Its config section's key (``finetune``), and its entry point's name."""
    section: type | None = None
    """The dataclass of its config section, or None when it has none."""

    def check(self, cfg: Config) -> None:
        """Cross-field checks of its section: raise ConfigError naming the key."""

    def prepare_model(
        self, model: nn.Module, cfg: Config, *, load_weights: bool = True
    ) -> TrainerHooks | None:
        """Change the freshly built model (``load_weights`` false: only its structure, for explain and
        for loading a checkpoint); the hooks the training loop should call, or None."""
        return None

    def export_model(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The model to export (the same one, or one with the feature's parts folded in)."""
        return model

    def export_adapters(
        self, model: nn.Module, cfg: Config, *, layout: str, out_dir: Path, dtype: torch.dtype
    ) -> dict[str, Any] | None:
        """Write the feature's trained parts alone into ``out_dir`` (``export --adapters-only``, for
        the ``layout`` of the base model's export); what to record of them, or None: nothing to write."""
        return None


@functools.cache
def features() -> tuple[Feature, ...]:
    """Every installed feature, in entry-point name order (loaded once per process)."""
    from importlib.metadata import distributions

    # Every distribution's, not importlib's one per name: a stale mupfast.egg-info in the working
    # directory (an old build) comes first on sys.path and would hide the installed entry points.
    found: dict[str, Any] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.setdefault(ep.name, ep)
    return tuple(found[name].load() for name in sorted(found))


class _AllHooks(TrainerHooks):
    """The hooks of several features, called in turn."""

    def __init__(self, hooks: list[TrainerHooks]):
        self.hooks = hooks

    def samplers(self, train_sampler, val_sampler):
        for h in self.hooks:
            train_sampler, val_sampler = h.samplers(train_sampler, val_sampler)
        return train_sampler, val_sampler

    def before_step(self, skip=None) -> None:
        for h in self.hooks:
            h.before_step(skip)

    def after_step(self, step: int) -> None:
        for h in self.hooks:
            h.after_step(step)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.hooks:
            out.update(h.metrics())
        return out


def prepare_model(model: nn.Module, cfg: Config, *, load_weights: bool = True) -> TrainerHooks:
    """Every feature's change to a freshly built model; the training loop's hooks of all of them."""
    hooks = [h for f in features() if (h := f.prepare_model(model, cfg, load_weights=load_weights))]
    return hooks[0] if len(hooks) == 1 else _AllHooks(hooks)


def export_model(model: nn.Module, cfg: Config) -> nn.Module:
    """The model ``mupfast export`` writes: every feature's parts folded in, in turn."""
    for f in features():
        model = f.export_model(model, cfg)
    return model


def export_adapters(
    model: nn.Module, cfg: Config, *, layout: str, out_dir: Path, dtype: torch.dtype
) -> dict[str, Any] | None:
    """The first feature's own parts written alone (``export --adapters-only``); None when no
    feature has any in this run."""
    for f in features():
        record = f.export_adapters(model, cfg, layout=layout, out_dir=out_dir, dtype=dtype)
        if record is not None:
            return record
    return None


def feature_sections() -> dict[str, Any]:
    """Config section key → its dataclass, for every feature that has one."""
    return {f.name: f.section for f in features() if f.section is not None}


def check_feature_sections(cfg: Config) -> None:
    """Every feature's checks of its config section (those of a config that lacks it are skipped)."""
    for f in features():
        if f.section is None or f.name in cfg.sections:
            f.check(cfg)
