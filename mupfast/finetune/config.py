"""The ``finetune`` config section and its checks, registered by :mod:`mupfast.finetune.plugin`.

:class:`FinetuneConfig` is the section (``cfg.finetune``); :func:`check_finetune` its cross-field
rules, which ``mupfast.config.validate.validate`` runs through the feature. The base run's directory
is not checked here (a fine-tuned run exported on another machine must load); the trainer checks it
when it loads the base weights. Imports nothing heavy: the config loader loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mupfast.errors import ConfigError

if TYPE_CHECKING:
    from mupfast.config import Config


@dataclass
class FinetuneConfig:
    """Fine-tuning a trained run (``mupfast finetune``, mupfast/finetune/): the base is frozen and
    adapters are attached to the named components; their μP rules are in docs/finetune.md."""

    method: Literal["none", "full", "lora", "adalora", "adamole"] = "none"
    """none: not a fine-tune (pretraining); full: every weight trains from the base run's; lora,
    adalora, adamole: the base is frozen and only the adapters train."""
    base_run: str = ""
    """Run directory of the trained model (config.yaml + checkpoints/, any ZeRO stage)."""
    target_components: list[str] = field(default_factory=lambda: ["q", "v"])
    """Rules-table components whose matrices get adapters: q, k, v, o, ffn_in, ffn_out."""
    rank: int = 8
    """LoRA rank r (AdaMoLE: each expert's rank)."""
    alpha: float = 16.0
    """LoRA scale α: the adapter's output is × α/r (AdaLoRA: α/init_rank, as PEFT)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    lora_plus_ratio: float = 1.0
    """LoRA+ ratio lr_B/lr_A at the base width (the μP rule multiplies it by m_in at width m)."""
    init_rank: int = 12
    """AdaLoRA: the rank every adapted matrix starts with (PEFT's init_r)."""
    target_rank: int = 8
    """AdaLoRA: average final rank per adapted matrix; the total budget is this × matrices (PEFT's target_r)."""
    tinit: int = 0
    """AdaLoRA: warm-up steps before any rank is pruned."""
    tfinal: int = 0
    """AdaLoRA: final steps at the target budget with the rank pattern fixed."""
    delta_t: int = 1
    """AdaLoRA: steps between two rank reallocations (PEFT's deltaT)."""
    beta1: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity |w·∂L/∂w|."""
    beta2: float = 0.85
    """AdaLoRA: EMA factor of its uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality penalty on P and Q added to the training loss."""
    experts: int = 4
    """AdaMoLE: LoRA experts per adapted matrix."""
    max_threshold: float | None = None
    """AdaMoLE: τ_max of the learned threshold τ(x) = τ_max·σ(w·x + b); None means 1/experts."""
    format: Literal["auto", "text", "prompt_completion"] = "auto"
    """data.corpus as documents (text: as for pretraining) or as prompt/completion JSON Lines records
    (the loss counts only completion tokens); auto: prompt_completion when the first record of a JSON
    Lines corpus has both fields below."""
    prompt_field: str = "prompt"
    """Prompt/completion JSON Lines (data.corpus): the field of the prompt (no loss on its tokens)."""
    completion_field: str = "completion"
    """… and of the completion (the loss counts these tokens and the EOS after them)."""


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
