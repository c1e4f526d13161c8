"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update, and the wrapper every adapter shares.

:class:`AdaptedLinear` takes the place of a model's ``nn.Linear`` (``blocks.0.attn.q``): it keeps the
base ``weight`` and ``bias`` under their own names (so checkpoints, the rules table and the export
still find them) and adds ``adapter(x)`` to the base output. The surrounding module's forward
multipliers (attention scale, residual-branch scale) apply to the sum, exactly as to the base
output, so merging ``W + ΔW`` is exact.

:class:`LoraAdapter` is ``ΔW = (α/r)·B·A`` with ``A`` (r × fan_in) and ``B`` (fan_out × r), ``B = 0``
at the start (the identity), PEFT's ``lora_A`` / ``lora_B``. Init and learning rates come from the
μP rules of :mod:`mupfast.finetune.rules`, which every adapter states for the rules table itself
(``mup_rules``: the table's name patterns know nothing of adapters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mupfast.finetune.rules import AdapterSite, adapter_rule
from mupfast.parametrization import ParametrizationError

if TYPE_CHECKING:
    from mupfast.config import ModelConfig
    from mupfast.parametrization import Rule

#: What names a fine-tuning adapter's parameters (``blocks.0.attn.q.adapter.lora_A``).
ADAPTER_MARK = ".adapter."


class Adapter(nn.Module):
    """What every adapter provides: ``forward(x)`` (the update's output, added to the base output),
    ``delta_weight()`` (the same update as a matrix, where one exists) and ``kind``."""

    kind = "adapter"
    mergeable = True
    """Whether the update is one matrix ΔW for every input (AdaMoLE's is not: it gates per token)."""

    rank: int
    alpha: float
    site: AdapterSite | None = None
    """Set when the adapter is attached (:func:`~mupfast.finetune.adapters.attach_adapters`)."""

    def __init__(self, fan_in: int, fan_out: int, dropout: float):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def mup_rules(self, prefix: str, cfg: ModelConfig) -> list[Rule]:
        """The rules of this adapter's parameters, named ``prefix.<parameter>`` (the rules table asks:
        :class:`mupfast.parametrization.StatesOwnRules`)."""
        if self.site is None:
            raise ParametrizationError(f"{prefix}: a {self.kind} adapter attached to no matrix has no rules")
        scale = self.alpha / self.rank  # AdaLoRA's rank is its init_rank: α/r₀, as PEFT
        return [
            adapter_rule(
                cfg, self.site, self.kind, scale, f"{prefix}.{pname}", tuple(getattr(p, "ds_shape", p.shape))
            )
            for pname, p in self.named_parameters()
        ]

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
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
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
