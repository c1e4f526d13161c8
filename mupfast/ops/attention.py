"""Causal attention as the model calls it: one function, the backend chosen here.

``torch`` is SDPA with scale = α/d (FlexAttention with a document block mask for packed documents on
CUDA, SDPA with the dense block-diagonal mask elsewhere); ``triton`` is our kernel
(:mod:`mupfast.kernels.attention`); ``auto`` is torch off CUDA and, on CUDA, the fastest measured per
shape of our kernel and its peers (:mod:`mupfast.ops.attention_select`), our kernel wherever document
ids or a deterministic backward need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLEX = None  # FlexAttention, compiled once per process (CUDA only: it has no CPU backward)


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
    if choice != "torch":  # the fastest measured peer for this shape
        from mupfast.ops.attention_select import run_attention

        return run_attention(choice, q, k, v, scale=scale, causal=True), None
    gqa = k.shape[1] != q.shape[1]
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa), None
    return document_attention(q, k, v, doc_ids, scale, gqa), None


def attention_backend(backend: str, q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None) -> str:
    """torch, triton, or on CUDA under ``auto`` the fastest measured for the shape (our kernel
    wherever document ids or a deterministic backward are needed)."""
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "torch"
    from mupfast.ops.attention_select import select_backend

    return select_backend(
        q,
        k,
        causal=True,
        has_doc_ids=doc_ids is not None,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: key s is visible to query t when s ≤ t and both are in one document (doc_ids
    as the data layer makes them: nondecreasing along a row, a document per value)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def document_attention(q, k, v, doc_ids: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """The torch backend's causal attention within documents: FlexAttention with a document BlockMask
    on CUDA (the tiles outside a document skipped), SDPA with the dense block-diagonal mask elsewhere
    (the CPU path and the reference)."""
    global _FLEX
    if q.is_cuda:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if _FLEX is None:
            _FLEX = torch.compile(flex_attention, dynamic=False)

        def same_document(b, h, qi, ki):
            return (doc_ids[b, qi] == doc_ids[b, ki]) & (qi >= ki)

        B, T = doc_ids.shape
        block_mask = create_block_mask(same_document, B, None, T, T, device=q.device)
        return _FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    mask = document_mask(doc_ids)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
