"""The μP transformer: its modules, mixture of experts, stability indicators and FLOPs.

* :mod:`~mupfast.model.transformer`: the decoder-only transformer, built from the rules table.
* :mod:`~mupfast.model.moe`: the SqrtGate mixture of experts in place of a block's MLP.
* :mod:`~mupfast.model.indicators`: attention Z, outlier share and the other stability statistics.
* :mod:`~mupfast.model.flops`: training FLOPs per token, throughput and MFU.

The rules themselves are :mod:`mupfast.parametrization` (the one μP contract; a public name).
"""

from mupfast.model.transformer import (
    KVCache,
    Rotary,
    Transformer,
    build_model,
    set_forward_multipliers,
)

__all__ = [
    "KVCache",
    "Rotary",
    "Transformer",
    "build_model",
    "set_forward_multipliers",
]
