"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update, and the wrapper every adapter shares.

:class:`AdaptedLinear` takes the place of a model's ``nn.Linear`` (``blocks.0.attn.q``): it keeps the
base ``weight`` and ``bias`` under their own names (so checkpoints, the rules table and the export
still find them) and adds ``adapter(x)`` to the base output. The surrounding module's forward
multipliers (attention scale, residual-branch scale) apply to the sum, exactly as to the base
output, so merging ``W + ΔW`` is exact.

:class:`LoraAdapter` is ``ΔW = (α/r)·B·A`` with ``A`` (r × fan_in) and ``B`` (fan_out × r), ``B = 0``
at the start (the identity), PEFT's ``lora_A`` / ``lora_B``. Init and learning rates come from the
μP rules of :mod:`mupfast.finetune.rules`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """What every adapter provides: ``forward(x)`` (the update's output, added to the base output),
    ``delta_weight()`` (the same update as a matrix, where one exists) and ``kind``."""

    kind = "adapter"
    mergeable = True
    """Whether the update is one matrix ΔW for every input (AdaMoLE's is not: it gates per token)."""

    def __init__(self, fan_in: int, fan_out: int, dropout: float):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ΔW = B·A and no extra scale: the PEFT LoRA form of the update (float64)."""
        raise NotImplementedError  # pragma: no cover

    def stats(self) -> dict[str, torch.Tensor]:
        """Detached device scalars of the last training forward, for metrics (none by default)."""
        return {}

    #: parameter name → the attribute holding the forward multiplier its rule carries.
    forward_mults: dict[str, str] = {}

    def set_forward_mult(self, pname: str, value: float) -> None:
        """Set the forward multiplier of parameter ``pname`` from its rule (1 where it has none)."""
        if pname in self.forward_mults:
            setattr(self, self.forward_mults[pname], value)
        elif value != 1.0:
            raise AssertionError(f"{self.kind}.{pname}: a forward multiplier {value} with nowhere to go")


class LoraAdapter(Adapter):
    """ΔW = (α/r)·B·A; A (r × fan_in), B (fan_out × r)."""

    kind = "lora"
    forward_mults = {"lora_B": "scale"}

    def __init__(self, fan_in: int, fan_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(fan_in, fan_out, dropout)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return F.linear(h, self.lora_B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.double() @ self.lora_A.double())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.double(), self.lora_B.double() * self.scale


class AdaptedLinear(nn.Module):
    """A frozen linear layer (its weight and bias under the original names) plus an adapter."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function: W + ΔW (rounded once, from float64)."""
        if not self.adapter.mergeable:
            raise ValueError(f"a {self.adapter.kind} adapter has no single weight to merge into")
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        w = (self.weight.double() + self.adapter.delta_weight().to(self.weight.device)).to(self.weight.dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapter={self.adapter.kind}"
        )


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted linear layer of ``model`` by its module path (``blocks.0.attn.q``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
