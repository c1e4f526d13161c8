"""Checks of the ``finetune`` config section (called by :func:`mupfast.config.validate.validate`).

The base run's directory is not checked here (a fine-tuned run exported on another machine must
load); the trainer checks it when it loads the base weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mupfast.errors import ConfigError

if TYPE_CHECKING:
    from mupfast.config import Config

#: Components an adapter can be attached to (their matrices are plain nn.Linear layers).
ADAPTABLE = ("q", "k", "v", "o", "ffn_in", "ffn_out")


def check_targets(components: list[str]) -> None:
    bad = [c for c in components if c not in ADAPTABLE]
    if bad or not components:
        raise ConfigError(
            f"finetune.target_components: {bad or 'empty'}; choose among {', '.join(ADAPTABLE)}"
        )


def check_finetune(cfg: Config) -> None:
    f = cfg.finetune
    if f.method == "none":
        return
    if f.method != "full":
        check_targets(f.target_components)
    for key, value in [("rank", f.rank), ("alpha", f.alpha), ("lora_plus_ratio", f.lora_plus_ratio)]:
        if not value > 0:
            raise ConfigError(f"finetune.{key}: must be positive (got {value})")
    if not 0 <= f.dropout < 1:
        raise ConfigError(f"finetune.dropout: must be in [0, 1) (got {f.dropout})")
    if f.method == "adalora":
        _check_adalora(cfg)
    if f.method == "adamole":
        if f.experts < 1:
            raise ConfigError(f"finetune.experts: must be at least 1 (got {f.experts})")
        if f.max_threshold is not None and not 0 <= f.max_threshold <= 1 / f.experts:
            raise ConfigError(
                f"finetune.max_threshold: must be in [0, 1/experts = {1 / f.experts:g}] so that the most "
                f"likely expert is always active (got {f.max_threshold})"
            )
    if not f.prompt_field or not f.completion_field or f.prompt_field == f.completion_field:
        raise ConfigError(
            "finetune.prompt_field: prompt_field and completion_field must be two different fields"
        )


def _check_adalora(cfg: Config) -> None:
    f, steps = cfg.finetune, cfg.train.steps
    if not 1 <= f.target_rank <= f.init_rank:
        raise ConfigError(
            f"finetune.target_rank: must be in [1, init_rank={f.init_rank}] (got {f.target_rank})"
        )
    if f.delta_t < 1:
        raise ConfigError(f"finetune.delta_t: must be at least 1 (got {f.delta_t})")
    if f.tinit < 0 or f.tfinal < 0 or f.tinit + f.tfinal >= steps:
        raise ConfigError(
            f"finetune.tinit: tinit ({f.tinit}) + tfinal ({f.tfinal}) must be non-negative and leave "
            f"budgeting steps within train.steps ({steps})"
        )
    for key, value in [("beta1", f.beta1), ("beta2", f.beta2)]:
        if not 0 < value < 1:
            raise ConfigError(f"finetune.{key}: must be in (0, 1) (got {value})")
    if f.orth_reg_weight < 0:
        raise ConfigError(f"finetune.orth_reg_weight: must be non-negative (got {f.orth_reg_weight})")
