"""SqrtGate mixture of experts (HyperP's MoE, from microsoft/ArchScale) in place of a block's MLP.

For a token x with router logits z = router_scale · W_r x (E experts):

    top-k experts S = topk(z, k),  g_i = softmax(z_S)_i   (gate probabilities renormalised over S)
    routed(x) = Σ_{i∈S} √g_i · expert_i(x)
    out(x)    = √(1−p) · routed(x) + √p · shared(x)      (with a shared expert; p = moe_shared_p)

The √g weights keep the output RMS one expert's at any k, E and granularity (docs/moe.md says why).
Training also records, per forward and on the device, the global-batch balance loss
E · Σ_i f_i · P_i (f_i counted over every data-parallel rank's micro-batch unless
moe_balance_scope is micro_batch) and router_z = mean logsumexp(z)²; the Transformer adds
coef·aux_loss (+ coef_z·router_z) to the LM loss.

Experts are separate 2-D nn.Linear layers (not a 3-D bank) so Muon can orthogonalise each matrix.
``moe_dispatch: grouped`` stacks them per forward for torch's grouped_mm (one matmul per weight kind,
the group boundaries a device tensor: no host sync); ``loop`` (default) runs one chain per expert.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mupfast.config import ModelConfig


class Expert(nn.Module):
    """One feed-forward expert of hidden size ``hidden``: SwiGLU (gate, up, down) or GELU (up, down)."""

    def __init__(self, d: int, hidden: int, swiglu: bool, bias: bool):
        super().__init__()
        self.swiglu = swiglu
        if swiglu:
            self.gate = nn.Linear(d, hidden, bias=bias)
        self.up = nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        return self.down(h)


def expert_hidden_size(cfg: ModelConfig) -> int:
    return cfg.filter_size // cfg.moe_granularity


class SqrtGateMoE(nn.Module):
    """Top-k softmax router over ``moe_experts`` experts, outputs weighted by √g.

    ``sqrt_gate=False`` weights by g instead (the usual gate; kept for the tests' contrast).
    """

    def __init__(self, cfg: ModelConfig, router_scale: float = 1.0, *, sqrt_gate: bool = True):
        super().__init__()
        d, h = cfg.hidden_size, expert_hidden_size(cfg)
        swiglu = cfg.mlp == "swiglu"
        self.num_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router_scale, self.sqrt_gate = router_scale, sqrt_gate
        self.router = nn.Linear(d, self.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, h, swiglu, cfg.bias) for _ in range(self.num_experts))
        self.shared = Expert(d, h, swiglu, cfg.bias) if cfg.moe_shared_expert else None
        self.shared_p = cfg.moe_shared_p
        self.global_balance = cfg.moe_balance_scope == "data_parallel"
        self.grouped = cfg.moe_dispatch == "grouped"
        self.swiglu = swiglu
        # From the last training forward: the balance loss and router Z with their graphs (read by the
        # Transformer), and detached indicators for stability_stats().
        self.aux_loss: torch.Tensor | None = None
        self.router_z: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def router_logits(self, x2: torch.Tensor) -> torch.Tensor:
        """(N, E) logits in fp32 (at least): routing decisions should not flip with bf16 rounding."""
        dtype = torch.promote_types(x2.dtype, torch.float32)
        return self.router_scale * F.linear(x2.to(dtype), self.router.weight.to(dtype))

    def gate_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (N, k) of the chosen experts and their weights √g (or g), g renormalised over the k."""
        top, idx = logits.topk(self.top_k, dim=-1)
        log_g = torch.log_softmax(top, dim=-1)
        # exp(½ log g) rather than sqrt(g): finite gradient even where g underflows to 0.
        return idx, torch.exp(0.5 * log_g if self.sqrt_gate else log_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.router_logits(x2)
        idx, w = self.gate_weights(logits)
        routed = self._dispatch(x2, idx, w)
        if self.shared is not None:
            routed = math.sqrt(1 - self.shared_p) * routed + math.sqrt(self.shared_p) * self.shared(x2)
        if self.training:
            self._record(logits, idx)
        else:
            self.aux_loss = self.router_z = None
        return routed.view(shape)

    def _dispatch(self, x2: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_k w·expert(x) per token: group the N·k assignments by expert, run the experts on their rows."""
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        rows = x2[order // k]
        counts = torch.bincount(flat, minlength=self.num_experts)
        # Every expert runs, even on zero tokens, so each weight gets a (zero) gradient: Muon and ZeRO
        # then see the same set of gradients on every step and rank.
        if self.grouped:
            y = self._grouped_experts(rows, counts, flat[order])
        else:  # one host sync per MoE layer: the per-expert token counts size the matmuls
            chunks = rows.split(counts.tolist())
            y = torch.cat([expert(c) for expert, c in zip(self.experts, chunks)])
        y = y * w.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        # Back to (token, slot) order and a sum over the k slots: deterministic (no atomic index_add).
        out = torch.empty_like(y).index_copy_(0, order, y)
        return out.view(N, k, -1).sum(1)

    def _grouped_experts(
        self, rows: torch.Tensor, counts: torch.Tensor, expert_of_row: torch.Tensor
    ) -> torch.Tensor:
        """Every expert on its rows (sorted by expert) in one grouped_mm per weight kind."""
        if rows.is_cuda and rows.dtype != torch.bfloat16:
            raise ValueError(
                f"model.moe_dispatch: grouped runs in bf16 on a GPU (got {rows.dtype}); use loop"
            )
        ends = counts.cumsum(0).to(torch.int32)

        def linear(x: torch.Tensor, name: str) -> torch.Tensor:
            layers = [getattr(e, name) for e in self.experts]
            out = F.grouped_mm(x, torch.stack([lin.weight for lin in layers]).transpose(1, 2), offs=ends)
            if layers[0].bias is not None:
                out = out + torch.stack([lin.bias for lin in layers])[expert_of_row]
            return out

        h = F.silu(linear(rows, "gate")) * linear(rows, "up") if self.swiglu else F.gelu(linear(rows, "up"))
        return linear(h, "down")

    def _record(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        E = self.num_experts
        probs = logits.softmax(-1)
        counts = torch.bincount(idx.reshape(-1), minlength=E).to(probs.dtype)
        assignments = idx.numel()
        if self.global_balance and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # every rank routes the same number of tokens
            assignments *= dist.get_world_size()
        f = counts / assignments  # share of assignments per expert (no gradient, as in Switch)
        self.aux_loss = E * (f * probs.mean(0)).sum()
        self.router_z = logits.logsumexp(-1).square().mean()
        self.stats = {
            "moe_aux_loss": self.aux_loss.detach(),
            "router_z": self.router_z.detach(),
            # MaxVio: how far the busiest expert is above the balanced load, relative to it.
            "moe_max_vio": (counts.max() * E / assignments - 1).detach(),
        }


def reference_moe(moe: SqrtGateMoE, x: torch.Tensor) -> torch.Tensor:
    """The same function one token at a time, written from the formula (tests compare against it)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(x2.shape[0]):
        xt = x2[t : t + 1]
        z = moe.router_scale * (xt @ moe.router.weight.t())[0]
        top, idx = torch.topk(z, moe.top_k)
        g = torch.exp(top - top.max())
        g = g / g.sum()
        wts = g.sqrt() if moe.sqrt_gate else g
        y = sum(wts[j] * moe.experts[int(idx[j])](xt)[0] for j in range(moe.top_k))
        if moe.shared is not None:
            y = math.sqrt(1 - moe.shared_p) * y + math.sqrt(moe.shared_p) * moe.shared(xt)[0]
        rows.append(y)
    return torch.stack(rows).view(x.shape)
