"""AdaLoRA (Zhang et al., 2023): SVD-form adapters whose ranks follow their importance, in a budget.

Each adapted matrix gets ΔW = (α/r₀)·P·diag(λ ⊙ mask)·Q with Q (r₀ × d_in, PEFT's lora_A),
λ (r₀ × 1, lora_E, zero at the start: the identity) and P (d_out × r₀, lora_B). After every step
the :class:`RankAllocator` scores each triplet (P_{:,i}, λ_i, Q_{i,:}) by

    S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji),   s(w) = Ī(w)·Ū(w),
    Ī ← β1·Ī + (1−β1)·I,   Ū ← β2·Ū + (1−β2)·|I − Ī|,   I(w) = |w · ∂L/∂w|

(PEFT's RankAllocator, checked against it in the tests) and keeps the ``budget(t)`` best triplets
over all matrices: the whole init_rank·n while t ≤ tinit, then a cubic fall to target_rank·n at
t = steps − tfinal, after which the rank pattern is fixed. An orthogonality penalty
mean(‖QQᵀ − I‖_F, ‖P̂ᵀP̂ − I‖_F) × orth_reg_weight joins the training loss (P̂ = P/√m_out, so
P's columns have unit norm at the proxy's width and P stays input-like under μP).

Why not PEFT's own classes (docs/finetune.md): its SVDLinear wraps a PEFT tuner model, its
allocator reads ``p.grad`` after ``optimizer.step()`` (DeepSpeed has cleared or partitioned the
gradients by then: here importance is read before the step through ``safe_get_full_grad``), and it
prunes by writing zeros into λ, which ZeRO's fp32 master weights overwrite at the next step. Here
the pruning is a ``rank_mask`` buffer (in every checkpoint, with the importance averages), so a
resumed run allocates exactly as the uninterrupted one. The budget is re-evaluated only at
reallocation steps (multiples of delta_t), so the total rank is within ``budget(t)`` at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mupfast.finetune.lora import Adapter

_PARTS = ("lora_A", "lora_E", "lora_B")


class SVDAdapter(Adapter):
    """ΔW = (α/r₀)·P·diag(λ ⊙ mask)·Q; P = lora_B, λ = lora_E, Q = lora_A."""

    kind = "adalora"
    forward_mults = {"lora_B": "scale"}

    def __init__(self, fan_in: int, fan_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(fan_in, fan_out, dropout)
        self.rank, self.alpha, self.scale, self.m_out = rank, alpha, alpha / rank, 1.0
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1))
        self.lora_B = nn.Parameter(torch.empty(fan_out, rank))
        self.register_buffer("rank_mask", torch.ones(rank))
        for part, shape in zip(_PARTS, [(rank, fan_in), (rank, 1), (fan_out, rank)]):
            self.register_buffer(f"ipt_{part}", torch.zeros(shape))  # Ī: smoothed sensitivity
            self.register_buffer(f"unc_{part}", torch.zeros(shape))  # Ū: its uncertainty
        self.orth: torch.Tensor | None = None

    def _values(self, dtype) -> torch.Tensor:
        return (self.lora_E.squeeze(-1) * self.rank_mask).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = F.linear(self.dropout(x), self.lora_A.to(dt)) * self._values(dt)
        if self.training:
            self.orth = orthogonality(self.lora_A, self.lora_B / math.sqrt(self.m_out))
        return F.linear(h, self.lora_B.to(dt)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        values = self._values(torch.float64)
        return self.scale * (self.lora_B.double() * values) @ self.lora_A.double()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.rank_mask > 0
        values = self._values(torch.float64)[keep]
        return self.lora_A.double()[keep], self.lora_B.double()[:, keep] * values * self.scale

    def scores(self) -> torch.Tensor:
        """S_i of each triplet from the importance averages (r₀,)."""
        s = {p: getattr(self, f"ipt_{p}") * getattr(self, f"unc_{p}") for p in _PARTS}
        return s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)


def orthogonality(Q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """‖QQᵀ − I‖_F + ‖PᵀP − I‖_F (PEFT's penalty of one adapter, summed over its two factors)."""
    eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
    return torch.linalg.matrix_norm(Q @ Q.t() - eye) + torch.linalg.matrix_norm(P.t() @ P - eye)


def add_orthogonality_penalty(model: nn.Module, modules: dict, weight: float) -> None:
    """Add weight × the mean penalty over every P and Q to the model's training loss (a forward hook,
    so the trainer's loss is the one AdaLoRA trains on; evaluation losses stay plain)."""
    adapters = [m.adapter for m in modules.values()]

    def hook(module, args, out):
        if not module.training or not isinstance(out, torch.Tensor) or out.ndim != 0 or weight == 0:
            return out
        terms = [a.orth for a in adapters if a.orth is not None]
        for a in adapters:
            a.orth = None
        if not terms:
            return out
        return out + weight * torch.stack(terms).sum().to(out.dtype) / (2 * len(adapters))

    model.register_forward_hook(hook)


def _full(p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the whole fp32 parameter, its whole gradient) under any ZeRO stage (None when it has none)."""
    try:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return p, p.grad
    grad = safe_get_full_grad(p)
    value = safe_get_full_fp32_param(p) if hasattr(p, "ds_id") else p
    return value, grad


class RankAllocator:
    """AdaLoRA's importance averages and rank allocation over a model's SVD adapters."""

    def __init__(self, modules: dict, f, total_steps: int):
        self.adapters = {path: m.adapter for path, m in modules.items()}
        self.f, self.total = f, total_steps
        n = len(self.adapters)
        self.init_budget, self.target_budget = f.init_rank * n, f.target_rank * n
        self.step = 0  # the last step allocate() saw

    def budget(self, step: int) -> int:
        """The total rank allowed after step ``step`` (1-based): PEFT's cubic schedule, evaluated at
        the last reallocation step (a multiple of delta_t), constant at the target from steps − tfinal."""
        f = self.f
        end = self.total - f.tfinal
        if step >= end:
            return self.target_budget
        at = step - step % f.delta_t  # the last reallocation step
        if at <= f.tinit:
            return self.init_budget
        left = 1 - (at - f.tinit) / (end - f.tinit)
        return int((self.init_budget - self.target_budget) * left**3 + self.target_budget)

    def allocates(self, step: int) -> bool:
        end = self.total - self.f.tfinal
        return step == end or (self.f.tinit < step < end and step % self.f.delta_t == 0)

    @torch.no_grad()
    def update_importance(self, skip: torch.Tensor | None = None) -> None:
        """Fold this step's |w·∂L/∂w| into Ī and Ū (after the backward, before the optimizer step);
        a step whose update is skipped (non-finite loss) leaves them as they were."""
        b1, b2 = self.f.beta1, self.f.beta2
        keep = None if skip is None else skip.bool().reshape(())
        for a in self.adapters.values():
            for part in _PARTS:
                value, grad = _full(getattr(a, part))
                if grad is None:
                    continue
                ipt = (value.float() * grad.float()).abs().view_as(getattr(a, f"ipt_{part}"))
                ipt_avg, unc_avg = getattr(a, f"ipt_{part}"), getattr(a, f"unc_{part}")
                new_ipt = b1 * ipt_avg + (1 - b1) * ipt
                new_unc = b2 * unc_avg + (1 - b2) * (ipt - new_ipt).abs()
                if keep is not None:
                    new_ipt, new_unc = (
                        torch.where(keep, ipt_avg, new_ipt),
                        torch.where(keep, unc_avg, new_unc),
                    )
                ipt_avg.copy_(new_ipt)
                unc_avg.copy_(new_unc)

    @torch.no_grad()
    def allocate(self, step: int) -> None:
        """At a reallocation step, keep the ``budget(step)`` highest-scoring triplets over all matrices."""
        self.step = step
        if not self.allocates(step):
            return
        scores = [a.scores() for a in self.adapters.values()]
        flat = torch.cat(scores)
        keep = torch.zeros_like(flat)
        order = torch.argsort(flat, descending=True, stable=True)
        keep[order[: self.budget(step)]] = 1.0
        for a, k in zip(self.adapters.values(), keep.split([len(s) for s in scores])):
            a.rank_mask.copy_(k)

    def ranks(self) -> dict[str, int]:
        return {path: int(a.rank_mask.sum().item()) for path, a in self.adapters.items()}

    def metrics(self) -> dict[str, float]:
        ranks = self.ranks()
        out = {f"rank/{path}": float(r) for path, r in ranks.items()}
        out["adalora/total_rank"] = float(sum(ranks.values()))
        out["adalora/budget"] = float(self.budget(self.step))
        return out
