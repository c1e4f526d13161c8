"""Causal attention as the model calls it: one function, the backend chosen here.

``torch`` is SDPA with scale = α/d (FlexAttention with a document block mask for packed documents on
CUDA, SDPA with the dense block-diagonal mask elsewhere); ``triton`` is our kernel
(:mod:`mupfast.kernels.attention`); ``auto`` is torch off CUDA and, on CUDA, the fastest per shape of our
kernel and its peers among those checked right against the reference (:mod:`mupfast.ops.attention_select`,
packed documents included), our kernel wherever a deterministic backward needs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mupfast.ops.attention_select import document_attention, document_mask, run_attention, select_backend

__all__ = ["causal_attention", "attention_backend", "document_attention", "document_mask"]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    backend: str = "auto",
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, lse) for q (B, Hq, T, D) and k, v (B, Hkv, T, D); lse (B, Hq, T) only from our kernel."""
    choice = attention_backend(backend, q, k, doc_ids)
    if choice == "triton":
        from mupfast.kernels.attention import mup_attention

        return mup_attention(q, k, v, scale=scale, causal=True, doc_ids=doc_ids, return_lse=True)
    if choice != "torch":  # the fastest right peer for this shape
        return run_attention(choice, q, k, v, scale=scale, causal=True, doc_ids=doc_ids), None
    gqa = k.shape[1] != q.shape[1]
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa), None
    return document_attention(q, k, v, doc_ids, scale, gqa), None


def attention_backend(backend: str, q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None) -> str:
    """torch, triton, or on CUDA under ``auto`` the fastest of the candidates that compute the shape right
    (our kernel wherever a deterministic backward is needed)."""
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "torch"
    return select_backend(
        q, k, causal=True, doc_ids=doc_ids, deterministic=torch.are_deterministic_algorithms_enabled()
    )
