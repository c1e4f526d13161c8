"""Folding the μP forward multipliers into the weights, and checking that nothing changed.

Inference stacks know nothing of μP: they compute ``logits = h Wᵀ``, attention with ``1/√d_head``,
plain residual sums and an unscaled embedding. Our forward multiplies in four places; each one is
linear in a single weight, so it moves into that weight exactly:

    embedding × embeddings_scale            → token (and learned position) embedding × s_emb
    logits × α_out/m                        → readout × s_out (untied when the tied weights now differ)
    attention logits × α_attn/d_head        → W_q (and b_q) × s_attn·√d_head, relative to HF's 1/√d_head
    residual branches × (L_base/L)^α        → W_o, W_down (and their biases) × s_res (CompleteP)

The folded weights are exactly the model in SP form (all four multipliers at their plain value), so
:func:`check_folding` compares :func:`fold_multipliers`' result with our own model under
``parametrization: sp`` (:func:`sp_config`) before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from mupfast.config import ModelConfig
from mupfast.export.load import rebuild_buffers
from mupfast.model import Transformer


@dataclass
class Folded:
    """Weights in our parameter names, every μP multiplier folded in (the model in SP form)."""

    state: dict[str, torch.Tensor]
    tied: bool
    """The readout still equals the embedding (tied in the export)."""
    factors: dict[str, float]
    """The folded multipliers, for the record."""


@torch.no_grad()
def fold_multipliers(model: Transformer) -> Folded:
    """Fold the forward multipliers the model really uses into its weights (fp32; products rounded once)."""
    cfg = model.cfg
    s_emb = float(model.embedding_scale)
    s_out = float(model.readout.logit_scale)
    s_attn = float(model.blocks[0].attn.scale) if len(model.blocks) else 1.0 / math.sqrt(cfg.head_dim)
    s_res = float(model.blocks[0].attn_branch_scale) if len(model.blocks) else 1.0  # for the record
    q_factor = s_attn * math.sqrt(cfg.head_dim)  # HF layouts divide by √d_head
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}

    def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
        return t if factor == 1.0 else (t.double() * factor).float()

    out = dict(sd)  # unscaled tensors are shared, not copied
    out["tok_emb.weight"] = scaled(sd["tok_emb.weight"], s_emb)
    if "pos_emb.weight" in sd:  # the scale multiplies (token + position)
        out["pos_emb.weight"] = scaled(sd["pos_emb.weight"], s_emb)
    readout = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["readout.weight"]
    tied = cfg.tie_embeddings and math.isclose(s_emb, s_out, rel_tol=1e-12)
    if tied:
        out.pop("readout.weight", None)
    else:  # untied: the tied weight serves two different products once folded
        out["readout.weight"] = scaled(readout, s_out)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        branch = {"attn.o": block.attn_branch_scale, "mlp.down": block.mlp_branch_scale}
        for name in ("attn.q.weight", "attn.q.bias"):
            if p + name in sd:
                out[p + name] = scaled(sd[p + name], q_factor)
        for module, factor in branch.items():
            for kind in ("weight", "bias"):
                if f"{p}{module}.{kind}" in sd:
                    out[f"{p}{module}.{kind}"] = scaled(sd[f"{p}{module}.{kind}"], float(factor))
    factors = {
        "embedding": s_emb,
        "readout": s_out,
        "attention_q": q_factor,
        "residual_branches": s_res,
    }
    return Folded(out, tied, factors)


def sp_config(cfg: ModelConfig, tied: bool) -> ModelConfig:
    """The config under which the folded weights compute the same function (plain multipliers)."""
    return dataclasses.replace(
        cfg, parametrization="sp", tie_embeddings=tied, attention_backend="torch", readout_backend="torch"
    )


@torch.no_grad()
def check_folding(model: Transformer, folded: Folded, *, seq_len: int = 16, tol: float = 1e-4) -> float:
    """Max |Δlogit| / (1 + max |logit|) between the model and its folded SP twin (fp32); raises above tol."""
    cfg = model.cfg
    with torch.device("meta"):
        twin = Transformer(sp_config(cfg, folded.tied))
    twin.load_state_dict(folded.state, assign=True)  # shares the folded tensors: no copy
    rebuild_buffers(twin, cfg)
    twin.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, min(seq_len, cfg.max_seq_len)), generator=gen)
    ref, got = model(tokens.to(device)).cpu(), twin(tokens)
    err = ((got - ref).abs().max() / (1 + ref.abs().max())).item()
    if not err <= tol:
        raise RuntimeError(f"folded model differs from the μP model: relative logit error {err:.2e}")
    return err
