"""Fine-tuning as a feature of the core: what the entry point ``mupfast.features: finetune`` names.

The core finds :data:`FEATURE` through pyproject.toml's entry points and calls it at its fixed
points (:mod:`mupfast.plugins`): the ``finetune`` config section and its checks, the model change
before training (the base run's weights, the frozen base and its adapters) with the trainer's hooks,
the adapters merged before export, and ``export --adapters-only``. The config loader imports this
module, so it imports only the section; the rest is imported when a hook runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mupfast.finetune.config import FinetuneConfig, check_finetune
from mupfast.plugins import Feature, TrainerHooks

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from mupfast.config import Config

#: Methods that attach adapters (full fine-tuning trains the base itself; none is pretraining).
ADAPTER_METHODS = ("lora", "adalora", "adamole")


def _method(cfg: Config) -> str:
    """finetune.method, or none for a config built without the section."""
    section = cfg.sections.get("finetune")
    return "none" if section is None else section.method


class FinetuneFeature(Feature):
    name = "finetune"
    section = FinetuneConfig

    def check(self, cfg: Config) -> None:
        check_finetune(cfg)

    def prepare_model(
        self, model: nn.Module, cfg: Config, *, load_weights: bool = True
    ) -> TrainerHooks | None:
        """The base run's weights (``load_weights``), the frozen base with its adapters; the trainer's
        hooks (:class:`~mupfast.finetune.attach.Tuner`), or None where nothing trains."""
        if _method(cfg) == "none":
            return None
        from mupfast.finetune.attach import prepare_finetune

        return prepare_finetune(model, cfg, load_weights=load_weights)

    def export_model(self, model: nn.Module, cfg: Config) -> nn.Module:
        """The adapters merged into the weights (an error naming the reason for AdaMoLE's)."""
        if _method(cfg) not in ADAPTER_METHODS:
            return model
        from mupfast.finetune.merge import merge_adapters

        return merge_adapters(model)

    def export_adapters(
        self, model: nn.Module, cfg: Config, *, layout: str, out_dir: Path, dtype: torch.dtype
    ) -> dict[str, Any] | None:
        """A PEFT LoRA folder of the adapters (:func:`~mupfast.finetune.merge.write_peft_adapter`)."""
        method = _method(cfg)
        if method not in ADAPTER_METHODS:
            return None
        from mupfast.finetune.merge import write_peft_adapter

        f = cfg.finetune
        config = write_peft_adapter(model, layout, out_dir, dtype, f.base_run)
        return {
            "method": method,
            "base_run": f.base_run,
            "layout": layout,
            "ranks": config["rank_pattern"],
            "how_to_load": "PeftModel.from_pretrained(<`mupfast export` of the base run>, this folder)",
        }


FEATURE = FinetuneFeature()
