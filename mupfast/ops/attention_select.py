"""Attention's candidates under `model.attention_backend: auto` on CUDA, decided per shape by
:mod:`mupfast.ops.dispatch`: our Triton kernel, SDPA's cuDNN and flash backends and flash-attn's
`flash_attn_func`; for packed documents (document ids) our kernel, FlexAttention with a document block mask
and flash-attn's `flash_attn_varlen_func`.

A key is (head dim, T, causal, GQA group, dtype, documents or not). Each candidate is checked forward and
backward against the fp32 reference (at batch 1 and one kv head: the reference holds T×T scores), then timed
forward+backward at the caller's batch and head count (and document ids). Decisions are cached in
`$MUPFAST_CACHE_DIR/attention_backends.json` under a fingerprint that includes the cuDNN and flash-attn versions
and a hash of our kernel's source. Our kernel is returned without deciding when the caller needs what only it
gives: the log-sum-exp or a deterministic backward.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mupfast.ops import dispatch
from mupfast.ops.dispatch import Dispatcher, Unavailable

__all__ = [
    "CANDIDATES",
    "DOC_CANDIDATES",
    "ShapeKey",
    "BackendSelector",
    "select_backend",
    "run_attention",
    "default_cache_path",
    "document_attention",
    "document_mask",
]

log = logging.getLogger(__name__)

#: The candidates for plain causal (or full) attention, and for packed documents.
CANDIDATES = ("triton", "sdpa_cudnn", "sdpa_flash", "flash_attn")
DOC_CANDIDATES = ("triton", "flex", "flash_attn_varlen")
ALL_CANDIDATES = tuple(dict.fromkeys(CANDIDATES + DOC_CANDIDATES))
CHECK_BATCH = 1  # the check runs at batch ≤ this, one kv head: the fp32 reference holds T×T scores
_FLEX = None  # FlexAttention, compiled once per process (CUDA only: it has no CPU backward)


@dataclass(frozen=True)
class ShapeKey:
    """What a choice depends on (batch and head count only scale the work, so they are not part of it)."""

    head_dim: int
    seq_len: int
    causal: bool
    group: int  # query heads per kv head (1: no GQA)
    dtype: str  # "bfloat16", "float16", "float32"
    docs: bool = False  # packed documents (document ids)

    def label(self) -> str:
        kind = "causal" if self.causal else "full"
        return f"D{self.head_dim}-T{self.seq_len}-{kind}-g{self.group}-{self.dtype}" + (
            "-docs" if self.docs else ""
        )

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, causal: bool, docs: bool = False) -> ShapeKey:
        group = q.shape[1] // k.shape[1]
        return cls(q.shape[-1], q.shape[2], bool(causal), group, dispatch.dtype_name(q.dtype), bool(docs))


def default_cache_path() -> Path:
    return dispatch.default_cache_path("attention")


# ------------------------------------------------------------------ running a candidate --------------------
def run_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                  causal: bool, doc_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(scale·QKᵀ)·V by ``backend``: q (B,Hq,T,D), k/v (B,Hkv,T,D) → (B,Hq,T,D); ``doc_ids`` (B,T) for
    the document backends. "triton" is not taken: the model calls our kernel itself, for its log-sum-exp."""
    gqa = q.shape[1] != k.shape[1]
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn takes (B, T, H, D) with the last dim contiguous (a transpose keeps it so) and does GQA
        # itself when k/v have fewer heads.
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                            causal=causal)  # fmt: skip
        return o.transpose(1, 2)
    if backend == "flex":
        return document_attention(q, k, v, doc_ids, scale, gqa)
    if backend == "flash_attn_varlen":
        return _flash_attn_varlen(q, k, v, doc_ids, scale)
    if backend == "triton":
        raise ValueError("run_attention does not run 'triton': call mupfast.kernels.attention.mup_attention")
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ALL_CANDIDATES}")


def _flash_attn_varlen(q, k, v, doc_ids: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn over the documents as variable-length sequences: the batch's rows flattened to
    (B·T, H, D), a sequence per document (``cu_seqlens`` from ``doc_ids``; its longest read to the host)."""
    from flash_attn import flash_attn_varlen_func

    B, Hq, T, D = q.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D)

    o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, softmax_scale=scale,
                               causal=True)  # fmt: skip
    return o.reshape(B, T, Hq, D).transpose(1, 2)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: key s is visible to query t when s ≤ t and both are in one document (doc_ids
    as the data layer makes them: nondecreasing along a row, a document per value)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


def document_attention(q, k, v, doc_ids: torch.Tensor, scale: float, gqa: bool) -> torch.Tensor:
    """Causal attention within documents: FlexAttention with a document BlockMask on CUDA (the tiles
    outside a document skipped), SDPA with the dense block-diagonal mask elsewhere (the CPU path and the
    reference)."""
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


def _attention_fn(name: str, device: torch.device) -> Callable:
    """``fn(q, k, v, scale, causal, doc_ids) -> o``: the call the model makes (our kernel returns the lse too)."""
    if name == "triton":
        from mupfast.kernels.attention import mup_attention

        return lambda q, k, v, scale, causal, doc_ids: mup_attention(
            q, k, v, scale=scale, causal=causal, doc_ids=doc_ids, return_lse=True
        )[0]
    if name.startswith("flash_attn") and importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn is not installed")
    if name == "flex" and device.type != "cuda":
        raise Unavailable("FlexAttention has no CPU backward")
    if name not in ALL_CANDIDATES:
        raise ValueError(f"unknown attention backend {name!r}")
    return lambda q, k, v, scale, causal, doc_ids: run_attention(
        name, q, k, v, scale=scale, causal=causal, doc_ids=doc_ids
    )


# ------------------------------------------------------------------ checking and timing a candidate ---------
def _inputs(key: ShapeKey, batch: int, q_heads: int, device: torch.device):
    """q, k, v (requiring grad) and the output gradient of ``key``'s shape, from a private generator."""
    g = dispatch.generator(device)
    dtype = getattr(torch, key.dtype)

    def randn(h: int) -> torch.Tensor:
        return torch.randn((batch, h, key.seq_len, key.head_dim), generator=g, device=device, dtype=dtype)

    kv_heads = q_heads // key.group
    return (
        randn(q_heads).requires_grad_(),
        randn(kv_heads).requires_grad_(),
        randn(kv_heads).requires_grad_(),
        randn(q_heads),
    )


def check_candidate(name: str, key: ShapeKey, *, device: torch.device, doc_ids: torch.Tensor | None = None,
                    batch: int = CHECK_BATCH, **_) -> str | None:  # fmt: skip
    """None when ``name`` computes attention and its gradients at ``key`` within the dtype's tolerance of the
    fp32 reference (fp64 for fp32 inputs), else why not; at batch ≤ CHECK_BATCH with one kv head."""
    from mupfast.kernels.attention import attention_reference

    fn = _attention_fn(name, device)
    b = min(batch, CHECK_BATCH)
    docs = doc_ids[:b] if doc_ids is not None else None
    q, k, v, do = _inputs(key, b, key.group, device)
    scale = 1.0 / key.head_dim
    with dispatch.measuring(device):
        o = fn(q, k, v, scale, key.causal, docs)
        got = dict(zip(("o", "dq", "dk", "dv"), (o, *torch.autograd.grad(o, (q, k, v), do))))
        ref_in = [t.detach().to(dispatch.reference_dtype(q.dtype)).requires_grad_() for t in (q, k, v)]
        o_ref = attention_reference(*ref_in, scale=scale, causal=key.causal, doc_ids=docs)
        ref = dict(zip(got, (o_ref, *torch.autograd.grad(o_ref, ref_in, do.to(o_ref.dtype)))))
    return dispatch.mismatch(got, ref, dispatch.tolerance(key.dtype))


def time_candidate(name: str, key: ShapeKey, *, batch: int, q_heads: int, device: torch.device,
                   doc_ids: torch.Tensor | None = None) -> float:  # fmt: skip
    """Median milliseconds of one forward+backward of ``name`` at this shape, on random tensors."""
    if device.type != "cuda":
        raise Unavailable(f"measuring needs a CUDA device, got {device}")
    fn = _attention_fn(name, device)
    q, k, v, do = _inputs(key, batch, q_heads, device)
    scale = 1.0 / key.head_dim

    def step() -> None:
        o = fn(q, k, v, scale, key.causal, doc_ids)
        torch.autograd.grad(o, (q, k, v), do)

    with dispatch.measuring(device):
        return dispatch.cuda_ms(step, device)


def environment_versions() -> dict[str, str]:
    return {
        **dispatch.base_versions(),
        "cudnn": str(torch.backends.cudnn.version()),
        "flash_attn": dispatch.package_version("flash-attn", "flash_attn"),
        "mupfast_attention_kernel": dispatch.source_hash("mupfast.kernels.attention"),
    }


# ------------------------------------------------------------------ the selector -----------------------------
class BackendSelector(Dispatcher):
    """Attention's :class:`~mupfast.ops.dispatch.Dispatcher`: keys from the tensors, the document candidates
    for a key with documents and the others for one without.

    ``check(name, key) -> None | why`` and ``timer(name, key) -> milliseconds`` replace the real check and
    CUDA measurement (tests inject them); ``device_name`` and ``versions`` replace what is read from the device
    and the installed packages; ``cache_path`` defaults to ``default_cache_path()``.
    """

    def __init__(self, cache_path: Path | None = None, timer=None, candidates: tuple[str, ...] = ALL_CANDIDATES,
                 device_name: str | None = None, versions: dict | None = None, check=None):  # fmt: skip
        unknown = set(candidates) - set(ALL_CANDIDATES)
        if unknown or not candidates:
            raise ValueError(f"candidates must be a nonempty subset of {ALL_CANDIDATES}; got {candidates}")
        super().__init__("attention", candidates, fallback="triton", versions_fn=environment_versions,
                         cache_path=cache_path, check=check, timer=timer, device_name=device_name,
                         versions=versions, logger=log)  # fmt: skip

    def candidates_for(self, key: ShapeKey) -> tuple[str, ...]:
        pool = DOC_CANDIDATES if key.docs else CANDIDATES
        return tuple(n for n in self.candidates if n in pool)

    # The hit path: plain Python on shapes, which torch.compile traces into guards (no graph break).
    def select(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool, needs_lse: bool = False,
               has_doc_ids: bool = False, deterministic: bool = False,
               doc_ids: torch.Tensor | None = None) -> str:  # fmt: skip
        """`select_backend` on any device (tests run it on CPU tensors with an injected check and timer)."""
        if needs_lse or deterministic or torch.are_deterministic_algorithms_enabled():
            return "triton"  # only our kernel gives these: nothing to decide
        if has_doc_ids and doc_ids is None:
            return "triton"  # documents without their ids: nothing to check the peers on
        fast = (
            q.shape[-1],
            q.shape[2],
            bool(causal),
            q.shape[1] // k.shape[1],
            q.dtype,
            q.device,
            doc_ids is None,
        )
        hit = self.hits.get(fast)
        return hit if hit is not None else self._select_miss(fast, q, k, causal, doc_ids)

    @torch.compiler.disable
    def _select_miss(self, fast: tuple, q: torch.Tensor, k: torch.Tensor, causal: bool, doc_ids) -> str:
        key = ShapeKey.of(q, k, causal, doc_ids is not None)
        choice = self.choose(key, batch=q.shape[0], q_heads=q.shape[1], device=q.device, doc_ids=doc_ids)
        self.hits[fast] = choice
        return choice

    @torch.compiler.disable
    def choose(self, key: ShapeKey, *, batch: int = 1, q_heads: int | None = None,
               device: torch.device | str | None = None, doc_ids: torch.Tensor | None = None) -> str:  # fmt: skip
        """The fastest right candidate for ``key``: from memory, else from the cache file, else checked and
        measured (at ``batch`` × ``q_heads`` on ``device``; default 1 × 8 kv heads' worth, the current device)."""
        device = torch.device(device) if device is not None else dispatch._current_device()
        ctx = dict(batch=batch, q_heads=q_heads or 8 * key.group, device=device, doc_ids=doc_ids)
        return super().choose(
            key, check=lambda n, k: check_candidate(n, k, **ctx), timer=lambda n, k: time_candidate(n, k, **ctx),
            device=device,
        )  # fmt: skip


# ------------------------------------------------------------------ the module-level entry point ------------
_DEFAULT = BackendSelector()


def select_backend(q: torch.Tensor, k: torch.Tensor, *, causal: bool, needs_lse: bool = False,
                   has_doc_ids: bool = False, deterministic: bool = False,
                   doc_ids: torch.Tensor | None = None) -> str:  # fmt: skip
    """A candidate for attention on q (B,Hq,T,D), k (B,Hkv,T,D) (and ``doc_ids`` (B,T) for packed documents):
    the fastest of those that computed it right on this shape key, or "triton" without deciding when only our
    kernel will do (lse, deterministic backward, also when torch's deterministic algorithms are on) or the
    tensors are not on CUDA; "torch" (causal_attention's SDPA path) when our kernel, too, computed it wrong."""
    if not q.is_cuda:  # nothing to measure off CUDA; Triton runs there only under the interpreter
        return "triton"
    return _DEFAULT.select(q, k, causal=causal, needs_lse=needs_lse, has_doc_ids=has_doc_ids,
                           deterministic=deterministic, doc_ids=doc_ids)  # fmt: skip


def default_selector() -> BackendSelector:
    """The selector `select_backend` uses (one per process)."""
    return _DEFAULT
