"""AdaMoLE (Liu & Luo, 2024): E LoRA experts per adapted matrix, a gate, and a learned threshold.

For a token x (the adapted layer's input):

    p(x) = softmax(s·W_g x)                      the gate over the E experts (W_g: E × d_in)
    τ(x) = τ_max · sigmoid(s·w_τ·x + b_τ)        the token's threshold (τ_max = 1/E by default)
    a_i  = max(p_i − τ, 0)                       expert i is active when p_i ≥ τ
    y    = Σ_i (a_i / Σ_j a_j) · (α/r)·B_i A_i x

so a token uses between one expert (the most likely one always has p_i ≥ 1/E ≥ τ) and all E, and
the threshold learns through the weights p_i − τ. PEFT does not ship AdaMoLE; this module follows
the authors' layer (zefang-liu/AdaMoLE). All experts are computed densely as batched matmuls (an
inactive expert's weight is exactly 0, so outputs and gradients equal the per-expert dispatch).
s = 1/m_in is the μP forward multiplier of the gate and threshold (output-like, as the MoE router).
B_i = 0 at the start, so the layer starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mupfast.finetune.lora import Adapter


def mole_weights(
    x: torch.Tensor,
    gate: torch.Tensor,
    threshold: torch.Tensor,
    threshold_bias: torch.Tensor,
    gate_scale: float,
    max_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised expert weights (N, E), active mask (N, E)) for tokens x (N, d_in)."""
    probs = F.softmax(gate_scale * F.linear(x, gate), dim=-1)
    tau = max_threshold * torch.sigmoid(gate_scale * F.linear(x, threshold) + threshold_bias)
    shifted = probs - tau
    active = shifted >= 0
    w = shifted * active
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total), active


class MoleAdapter(Adapter):
    """E LoRA experts (experts_A: E × r × d_in, experts_B: E × d_out × r) behind a gate and a threshold."""

    kind = "adamole"
    mergeable = False
    forward_mults = {"experts_B": "scale", "gate": "gate_scale", "threshold": "gate_scale"}

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        rank: int,
        alpha: float,
        experts: int,
        max_threshold: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(fan_in, fan_out, dropout)
        self.rank, self.alpha, self.experts = rank, alpha, experts
        self.scale, self.gate_scale = alpha / rank, 1.0
        self.max_threshold = 1.0 / experts if max_threshold is None else max_threshold
        self.experts_A = nn.Parameter(torch.empty(experts, rank, fan_in))
        self.experts_B = nn.Parameter(torch.zeros(experts, fan_out, rank))
        self.gate = nn.Parameter(torch.empty(experts, fan_in))
        self.threshold = nn.Parameter(torch.empty(1, fan_in))
        self.threshold_bias = nn.Parameter(torch.zeros(1))
        self._stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = self.dropout(x).reshape(-1, shape[-1])
        dt = x.dtype
        w, active = mole_weights(
            x,
            self.gate.to(dt),
            self.threshold.to(dt),
            self.threshold_bias.to(dt),
            self.gate_scale,
            self.max_threshold,
        )
        h = torch.einsum("nd,erd->ner", x, self.experts_A.to(dt))
        # One matmul over (expert, rank) pairs: no (tokens × experts × d_out) intermediate.
        y = torch.einsum("ner,eor->no", h * w.unsqueeze(-1), self.experts_B.to(dt)) * self.scale
        if self.training:
            use = active.detach().float()
            self._stats = {"experts_active": use.sum(-1).mean(), "expert_use": use.mean(0)}
        return y.reshape(*shape[:-1], self.fan_out)

    def stats(self) -> dict[str, torch.Tensor]:
        """Mean active experts per token and each expert's share of tokens (last training forward)."""
        if not self._stats:
            return {}
        out = {"experts_active": self._stats["experts_active"]}
        out.update({f"expert_use{e}": u for e, u in enumerate(self._stats["expert_use"])})
        return out
