"""The readout's loss: logit multiplier + cross-entropy without holding all logits at once.

``triton`` is the fused kernel (:func:`mupfast.kernels.cross_entropy.fused_linear_cross_entropy`),
``torch`` its chunked plain-PyTorch twin; ``auto`` is Triton on CUDA, torch elsewhere.
"""

from __future__ import annotations

import torch


def readout_backend(backend: str, h: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if h.is_cuda else "torch"
    return backend


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, logit_scale: float, backend: str = "auto"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over targets != -100, {max |logit|, mean lse²}) for h (N, d), weight (V, d)."""
    if readout_backend(backend, h) == "triton":
        from mupfast.kernels.cross_entropy import fused_linear_cross_entropy as fn
    else:
        from mupfast.kernels.cross_entropy import linear_cross_entropy_reference as fn
    return fn(h, weight, targets, logit_scale=logit_scale, return_stats=True)
