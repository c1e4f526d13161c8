"""Turning a freshly built model into the one a fine-tune trains, and the trainer's hooks.

:func:`prepare_finetune` is the feature's ``prepare_model`` (:mod:`mupfast.finetune.plugin`; the
trainer calls it right after ``build_model``): it loads the base run's weights (any ZeRO stage's
checkpoint, as ``mupfast export`` reads them), and for an adapter method freezes every base
parameter and replaces each target matrix (the rules-table components named in
``finetune.target_components``) by an :class:`~mupfast.finetune.lora.AdaptedLinear`. It returns a
:class:`Tuner`, the :class:`~mupfast.plugins.TrainerHooks` of the method (AdaLoRA's importance and
rank allocation, the adapters' metrics, prompt/completion batches). Without ``load_weights`` it
builds only the structure (``explain``, and ``load_run`` before it reads a fine-tune's checkpoint).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from mupfast.config import Config
from mupfast.errors import ConfigError
from mupfast.finetune.adapters import attach_adapters
from mupfast.finetune.lora import adapted_modules
from mupfast.plugins import TrainerHooks

#: Model keys a fine-tune may set differently from its base run (they do not change the function).
FREE_MODEL_KEYS = ("attention_backend", "readout_backend")


def check_base_model(cfg: Config, base: Config) -> None:
    """The fine-tune's model section must be its base run's (up to the backends)."""
    mine, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(base.model)
    for key in mine:
        if key not in FREE_MODEL_KEYS and mine[key] != theirs[key]:
            raise ConfigError(
                f"model.{key}: {mine[key]!r} differs from the base run's {theirs[key]!r} "
                f"({cfg.finetune.base_run}); a fine-tune keeps its base model's architecture"
            )


def load_base_weights(model: nn.Module, cfg: Config) -> int | None:
    """Load the latest checkpoint of finetune.base_run into ``model`` (before any adapter); its step."""
    from mupfast.export.load import read_checkpoint_weights, read_run_config

    if not cfg.finetune.base_run:
        raise ConfigError("finetune.base_run: empty (the run directory of the model to fine-tune)")
    base = read_run_config(cfg.finetune.base_run)
    if base.finetune.method not in ("none", "full"):
        raise ConfigError(
            f"finetune.base_run: {cfg.finetune.base_run} is itself an adapter fine-tune; export it "
            "merged (`mupfast export`) or fine-tune its base run"
        )
    check_base_model(cfg, base)
    state, tag_dir, step = read_checkpoint_weights(cfg.finetune.base_run)
    expected = set(model.state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[:3]
        raise ConfigError(f"finetune.base_run: {tag_dir} does not hold this model's weights ({odd})")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return step


class Tuner(TrainerHooks):
    """The training loop's calls into a fine-tuning method; every one is a no-op unless the method
    needs it. ``before_step`` runs after the last backward of a step (full gradients, any ZeRO
    stage), ``after_step(step)`` after the optimizer step, ``metrics()`` on logging steps."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.model, self.cfg = model, cfg
        self.modules = adapted_modules(model)
        self.allocator = None
        if cfg.finetune.method == "adalora":
            from mupfast.finetune.adalora import RankAllocator, add_orthogonality_penalty

            self.allocator = RankAllocator(self.modules, cfg.finetune, cfg.train.steps)
            add_orthogonality_penalty(model, self.modules, cfg.finetune.orth_reg_weight)

    def before_step(self, skip=None) -> None:
        """``skip``: the step's device flag for a non-finite loss (its gradients are not used)."""
        if self.allocator is not None:
            self.allocator.update_importance(skip)

    def after_step(self, step: int) -> None:
        if self.allocator is not None:
            self.allocator.allocate(step)

    def samplers(self, train_sampler, val_sampler):
        """Prompt/completion data: batches whose prompt tokens carry no loss (targets −100)."""
        from mupfast.finetune.data import completion_only

        return completion_only(train_sampler), completion_only(val_sampler)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.allocator is not None:
            out.update(self.allocator.metrics())
        stats = [m.adapter.stats() for m in self.modules.values()]
        for path, s in zip(self.modules, stats):
            out.update({f"{k}/{path}": float(v) for k, v in s.items()})
        return out


def prepare_finetune(model: nn.Module, cfg: Config, *, load_weights: bool = True) -> Tuner | None:
    """Nothing when finetune.method is none; otherwise the base run's weights (``load_weights``), and
    for an adapter method the frozen base with adapters attached (initialised only with the weights).
    The trainer's hooks, or None when only the structure was built."""
    f = cfg.finetune
    if f.method == "none":
        return None
    if load_weights:
        load_base_weights(model, cfg)
    if f.method != "full":
        attach_adapters(model, cfg, init=load_weights)
    return Tuner(model, cfg) if load_weights else None
