"""``mupfast export --format granite``: a μP model exported as itself, multipliers unfolded.

transformers' Granite is Llama (RMSNorm, RoPE, SwiGLU, GQA) with four forward multipliers in its
config, exactly the places μP multiplies: ``embedding_multiplier`` (our embeddings_scale),
``attention_multiplier`` (the attention logits' α_attn/d_head), ``residual_multiplier`` (the branch
outputs: CompleteP's m_L^-α, 1 under μP) and ``logits_scaling`` (logits are *divided* by it: m/α_out).
The weights go out as trained, so training them further in transformers or PEFT stays μP, given
μP's per-group lrs: ``optimizer_groups.json`` lists every group's parameters (by their transformers
names), lr and weight-decay multipliers and clip threshold (docs/export.md).

HyperP maps its multipliers but not its optimizer (Muon on the sphere), and a SqrtGate MoE has no
Granite layout: both are refused in one line (the folded Llama export serves inference).
"""

from __future__ import annotations

from typing import Any

import torch

from mupfast.config import Config, ModelConfig
from mupfast.errors import ConfigError
from mupfast.export.fold import Folded
from mupfast.export.layouts import hf_config, layout_for, llama_names
from mupfast.model import Transformer
from mupfast.optim.groups import base_lr, base_weight_decay, build_param_groups


def check_granite(cfg: ModelConfig) -> None:
    """One line naming the key when the model has no Granite equivalent."""
    if cfg.parametrization == "hyperp":
        raise ConfigError(
            "model.parametrization: hyperp trains its matrices with Muon on the sphere, which no transformers "
            "optimizer does; export it folded (--format folded) for inference"
        )
    if layout_for(cfg) != "llama":
        raise ConfigError(
            f"model.position: {cfg.position}: --format granite needs the Llama architecture "
            "(model.position=rope, model.norm=rmsnorm, model.mlp=swiglu)"
        )


def multipliers(model: Transformer) -> dict[str, float]:
    """Granite's four config multipliers, read from the forward multipliers the model really uses."""
    attn, mlp = (
        {float(b.attn_branch_scale) for b in model.blocks},
        {float(b.mlp_branch_scale) for b in model.blocks},
    )
    if len(attn | mlp) > 1:  # Granite has one residual multiplier for every branch
        raise ConfigError(
            f"the residual branches are scaled differently ({sorted(attn | mlp)}): no Granite equivalent"
        )
    return {
        "embedding_multiplier": float(model.embedding_scale),
        "attention_multiplier": float(model.blocks[0].attn.scale),
        "residual_multiplier": (attn | mlp).pop(),
        "logits_scaling": 1.0 / float(model.readout.logit_scale),
    }


def unfolded(model: Transformer) -> Folded:
    """The weights as trained (nothing folded), in the shape the Llama tensor layout takes."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return Folded(state, model.cfg.tie_embeddings, {})


def granite_config(model: Transformer, dtype: str, multipliers: dict[str, float]) -> dict[str, Any]:
    """config.json: the Llama one with Granite's name and ``multipliers`` (:func:`multipliers`)."""
    config = hf_config(model.cfg, "llama", model.cfg.tie_embeddings, dtype)
    config.pop("head_dim")  # Granite derives it: hidden_size / num_attention_heads
    config.update(architectures=["GraniteForCausalLM"], model_type="granite", **multipliers)
    return config


def optimizer_groups(model: Transformer, cfg: Config) -> dict[str, Any]:
    """optimizer_groups.json: μP's AdamW groups over the transformers parameter names."""
    ours = {id(p): name for name, p in model.named_parameters()}
    theirs = llama_names(cfg.model)
    groups = []
    for g in build_param_groups(model, cfg):
        names = [theirs[ours[id(p)]] for p in g["params"] if ours[id(p)] in theirs]
        if names:
            groups.append(
                {
                    "name": g["name"],
                    "lr_mult": g["lr_mult"],
                    "wd_mult": g["wd_mult"],
                    "max_grad_norm": g["max_grad_norm"],
                    "params": names,
                }
            )
    o = cfg.optim
    return {
        "optimizer": "AdamW (torch.optim.AdamW: decoupled, the decay is lr × weight_decay per group)",
        "lr": "base_lr × schedule(t) × lr_mult",
        "weight_decay": "base_weight_decay × wd_mult",
        "base_lr": base_lr(cfg),
        "base_weight_decay": base_weight_decay(cfg),
        "betas": [o.beta1, o.beta2],
        "eps": o.eps,
        "max_grad_norm": "each group's gradient norm clipped at its max_grad_norm before the update (0: off)",
        "global_max_norm": cfg.clip.global_max_norm,
        "groups": groups,
    }
