"""The μP rules of the adapters' parameters, as rows of the same table as the model's.

Tensor Programs V decides a matrix's rule by which of its dimensions grow with width. An adapter's
rank r is fixed, so (Adam; m_in, m_out the width multipliers of the adapted matrix's fan-in and
fan-out, c CompleteP's depth factor, 1 otherwise):

* A (r × fan_in: only the fan-in grows) is matrix-like for its learning rate: lr × c/m_in. Its init
  must keep ``A·x`` at Θ(1) per coordinate, since B = 0 at the start and B's first updates see only
  ``A·x``: std 1/√(3·fan_in) (PEFT's kaiming-uniform variance), which is σ_base/√m_in.
* B (fan_out × r: only the fan-out grows) updates each output coordinate through r fixed terms of
  Θ(1), so its lr does not shrink with width: lr × c·lora_plus_ratio. It starts at 0 (the identity).
  lr_B/lr_A is thus lora_plus_ratio at the base width and lora_plus_ratio·m_in at width m: LoRA+'s
  Θ(width) ratio, with the proxy's ratio carried over.
* AdaLoRA's λ (r values: nothing grows) is scalar-like: lr × c. Its P (= B) starts with columns of
  unit norm at the base width (std 1/√(fan_out/m_out)), Q (= A) with rows of unit norm (std 1/√fan_in).
* AdaMoLE's gate and threshold (d_in → E and → 1: only the fan-in grows) are output-like, as the
  MoE router: constant init, lr × c, forward × 1/m_in.

Weight decay follows model.weight_decay_scaling as for the base (independent: A's wd × m_in).

Each adapter states these rules itself (:meth:`~mupfast.finetune.lora.Adapter.mup_rules`), so
``rules_for`` lists them after the base model's rows without knowing what an adapter is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mupfast.parametrization import BLOCK_COMPONENTS, Rule, multipliers

if TYPE_CHECKING:
    from mupfast.config import ModelConfig


@dataclass(frozen=True)
class AdapterSite:
    """Where an adapter sits, as its rules need it: the rules-table component and layer of the matrix
    it adapts, and finetune.lora_plus_ratio (B's lr over A's at the base width). Set on the adapter
    when it is attached (:func:`~mupfast.finetune.adapters.attach_adapters`)."""

    component: str
    layer: int | None
    lora_plus_ratio: float = 1.0


def width_multipliers(cfg: ModelConfig, component: str) -> tuple[float, float]:
    """(m_in, m_out): how the fan-in and fan-out of a component's matrix grow with width."""
    mult = multipliers(cfg)
    if cfg.parametrization == "sp":
        return 1.0, 1.0
    m, m_f, m_kv = mult.m, mult.m_f, mult.m_kv
    return {
        "q": (m, m),
        "k": (m, m_kv),
        "v": (m, m_kv),
        "o": (m, m),
        "ffn_in": (m, m_f),
        "ffn_out": (m_f, m),
    }[component]


def _depth_factor(cfg: ModelConfig, component: str) -> float:
    mult = multipliers(cfg)
    if cfg.parametrization == "completep" and component in BLOCK_COMPONENTS:
        return mult.m_depth ** (cfg.depth_alpha - 1)
    return 1.0


def _wd(cfg: ModelConfig, width_mult: float) -> float:
    return {"independent": width_mult, "coupled": 1.0, "none": 0.0}[cfg.weight_decay_scaling]


def adapter_rule(
    cfg: ModelConfig, site: AdapterSite, kind: str, scale: float, name: str, shape: tuple[int, ...]
) -> Rule:
    """The rule of one parameter of a ``kind`` adapter at ``site`` (``name`` ends in the parameter's:
    lora_A, lora_B, …); ``scale`` is its α/r (AdaLoRA: α/init_rank, as PEFT), B's forward multiplier."""
    component, layer = site.component, site.layer
    pname = name.rsplit(".", 1)[-1]
    m_in, m_out = width_multipliers(cfg, component)
    c = _depth_factor(cfg, component)
    comp = f"{component}.{pname}"
    fan_in = shape[-1]
    if pname in ("lora_A", "experts_A"):
        std = 1.0 / math.sqrt(fan_in if kind == "adalora" else 3 * fan_in)
        return Rule(name, shape, comp, layer, "normal", std, c / m_in, _wd(cfg, m_in), 1.0)
    if pname in ("lora_B", "experts_B"):
        lr = c * site.lora_plus_ratio
        if kind == "adalora":  # P: unit-norm columns at the base width
            std = 1.0 / math.sqrt(shape[0] / m_out)
            return Rule(name, shape, comp, layer, "normal", std, lr, _wd(cfg, 1.0), scale)
        return Rule(name, shape, comp, layer, "zeros", 0.0, lr, _wd(cfg, 1.0), scale)
    if pname == "lora_E":
        return Rule(name, shape, comp, layer, "zeros", 0.0, c, _wd(cfg, 1.0), 1.0)
    if pname in ("gate", "threshold"):
        std = 1.0 / math.sqrt(3 * fan_in / m_in)  # constant in width: output-like, as the MoE router
        return Rule(name, shape, comp, layer, "normal", std, c, _wd(cfg, 1.0), 1.0 / m_in)
    if pname == "threshold_bias":
        return Rule(name, shape, comp, layer, "zeros", 0.0, c, 0.0, 1.0)
    raise AssertionError(f"no adapter rule for {name}")
