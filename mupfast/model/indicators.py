"""Stability indicators of the training forward: what the trainer logs beside the loss.

Per block: the RMS of each residual branch's contribution and the outlier share of the residual
stream after the block (elements beyond 5σ of their token); per attention layer: attention Z, the
mean lse² of its logits. The readout's max |logit| and mean lse² come from the fused loss, the MoE
balance loss, router Z and MaxVio from the MoE layer. Everything stays a detached device scalar
(no host sync); :func:`stability_stats` gathers them when the trainer logs.
"""

from __future__ import annotations

import torch
from torch import nn


def outlier_share(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Share of elements with |x − μ_token| > k·σ_token (μ, σ over the last dim); a device scalar."""
    x = x.detach().float()
    mu = x.mean(-1, keepdim=True)
    sigma = x.std(-1, keepdim=True, correction=0)
    return ((x - mu).abs() > k * sigma).float().mean()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().square().mean().sqrt()


def block_stats(attn_branch: torch.Tensor, mlp_branch: torch.Tensor, out: torch.Tensor) -> dict:
    """A block's indicators: each branch's RMS (as added to the stream) and the output's outlier share."""
    return {
        "attn_branch_rms": _rms(attn_branch),
        "mlp_branch_rms": _rms(mlp_branch),
        "outlier_share": outlier_share(out),
    }


@torch.no_grad()
def attention_lse(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = True, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """logsumexp over keys of scale·q·kᵀ (causal; within a document with ``doc_ids`` (B, T)), (B, Hq, T)
    in fp32 (fp64 stays fp64); GQA as SDPA's."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    B, H, T, _ = q.shape
    rows = max(1, 2**24 // max(1, B * H * k.shape[2]))  # bound the score block to 64 MiB of fp32
    cols = torch.arange(k.shape[2], device=q.device)
    out = []
    for s in range(0, T, rows):
        scores = (q[:, :, s : s + rows] @ k.transpose(-1, -2)) * scale
        if causal:
            r = torch.arange(s, s + scores.shape[2], device=q.device)
            scores.masked_fill_(cols[None, :] > r[:, None], float("-inf"))
        if doc_ids is not None:
            other = doc_ids[:, None, s : s + scores.shape[2], None] != doc_ids[:, None, None, :]
            scores.masked_fill_(other, float("-inf"))
        out.append(scores.logsumexp(-1))
    return torch.cat(out, dim=2)


class AttentionZ:
    """Attention Z of one attention layer's last training forward, kept cheaply until it is read.

    The Triton kernel returns the log-sum-exp for free (:meth:`from_lse`). SDPA gives none, so the
    torch path keeps q and k (:meth:`keep`, only while ``record`` is on) and computes lse when the
    indicators are read: only the steps the trainer logs pay for it, and the tensors are released then.
    """

    def __init__(self) -> None:
        self.record = True  # Transformer.record_indicators: whether a training forward keeps q, k
        self.value: torch.Tensor | None = None
        self.inputs: tuple | None = None  # q, k and doc_ids, detached

    def from_lse(self, lse: torch.Tensor) -> None:
        self.value, self.inputs = lse.detach().square().mean(), None

    def keep(self, q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None = None) -> None:
        self.value, self.inputs = None, ((q.detach(), k.detach(), doc_ids) if self.record else None)

    def read(self, scale: float) -> torch.Tensor | None:
        if self.inputs is not None:
            q, k, doc_ids = self.inputs
            self.value = attention_lse(q, k, scale, doc_ids=doc_ids).square().mean()
            self.inputs = None
        return self.value


def stability_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached device tensors of a Transformer's last forward.

    The readout's max |logit| and mean lse²; from the last training forward, averaged over blocks:
    attention Z, attention and MLP branch RMS and the outlier share; with MoE, averaged over MoE
    blocks, the balance loss, router Z and MaxVio, and the LM loss without them (``lm_loss``).
    """
    stats = dict(model.readout.stats)
    attn_z = [z for b in model.blocks if (z := b.attn.z.read(b.attn.scale)) is not None]
    if attn_z:
        stats["attn_lse_sq_mean"] = torch.stack(attn_z).mean()
    for key in ("attn_branch_rms", "mlp_branch_rms", "outlier_share"):
        per_block = [b.stats[key] for b in model.blocks if key in b.stats]
        if per_block:
            stats[key] = torch.stack(per_block).mean()
    for key in ("moe_aux_loss", "router_z", "moe_max_vio"):
        per_block = [b.mlp.stats[key] for b in model.blocks if key in getattr(b.mlp, "stats", {})]
        if per_block:
            stats[key] = torch.stack(per_block).mean()
    if model.lm_loss is not None:
        stats["lm_loss"] = model.lm_loss
    return stats
