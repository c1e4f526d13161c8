"""The readout's loss: logit multiplier + cross-entropy without holding all logits at once.

``triton`` is the fused kernel (:func:`mupfast.kernels.cross_entropy.fused_linear_cross_entropy`),
``torch`` its chunked plain-PyTorch twin; ``auto`` is torch off CUDA and, on CUDA, the fastest per shape of
those and Liger-Kernel's fused linear cross-entropy (where installed) among the ones that compute the loss and
its gradients right (:mod:`mupfast.ops.dispatch`; cache ``readout_backends.json``). Liger gives no
statistics (max |logit|, mean lse²), so it is a candidate only for a forward that does not record them
(the model records them on its logging steps only); such a forward returns no statistics.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from mupfast.ops import dispatch
from mupfast.ops.dispatch import Dispatcher, Unavailable

log = logging.getLogger(__name__)

CANDIDATES = ("triton", "liger", "torch")
STATS_CANDIDATES = ("triton", "torch")  # the ones that give the statistics
BACKENDS = ("auto", "torch", "triton", "liger")
CHECK_SCALE = 0.25  # the μP logit multiplier the checks run at: a candidate must apply it, not assume 1


@dataclass(frozen=True)
class ReadoutKey:
    rows: int
    hidden: int
    vocab: int
    dtype: str
    stats: bool  # the statistics are needed

    def label(self) -> str:
        return f"N{self.rows}-d{self.hidden}-V{self.vocab}-{self.dtype}" + ("-stats" if self.stats else "")


def run_readout(backend: str, h, weight, targets, *, logit_scale: float, stats: bool = True):
    """(loss, statistics) by ``backend``; the statistics are {} from a backend that has none (Liger)."""
    if backend == "triton":
        from mupfast.kernels.cross_entropy import fused_linear_cross_entropy as fn
    elif backend == "torch":
        from mupfast.kernels.cross_entropy import linear_cross_entropy_reference as fn
    elif backend == "liger":
        if stats:
            raise ValueError("the liger readout gives no statistics (max |logit|, mean lse²)")
        return _liger(h, weight, targets, logit_scale), {}
    else:
        raise ValueError(f"unknown readout backend {backend!r}; expected one of {BACKENDS}")
    return fn(h, weight, targets, logit_scale=logit_scale, return_stats=True)


def _liger(h, weight, targets, logit_scale: float) -> torch.Tensor:
    """Liger's fused linear cross-entropy of (scale·h)·Wᵀ: the μP logit multiplier folded into h (the
    gradient with respect to h carries it back through the product)."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel is not installed")
    if not h.is_cuda:
        raise Unavailable("liger-kernel runs on CUDA only")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(
        h * logit_scale, weight, targets, ignore_index=-100, reduction="mean"
    )
    return (out[0] if isinstance(out, tuple) else out).float()


def readout_backend(
    backend: str, h: torch.Tensor, weight: torch.Tensor | None = None, stats: bool = True
) -> str:
    """``backend`` unless ``auto``: then torch off CUDA, and on CUDA the decided candidate for the shapes of
    ``h`` and ``weight`` (our kernel when ``weight`` is not given)."""
    if backend != "auto":
        return backend
    if not h.is_cuda:
        return "torch"
    if weight is None:
        return "triton"
    fast = (h.shape, weight.shape[0], h.dtype, h.device, bool(stats))

    def key() -> ReadoutKey:
        return ReadoutKey(h.shape[0], h.shape[1], weight.shape[0], dispatch.dtype_name(h.dtype), bool(stats))

    return _DEFAULT.pick(fast, key, check_candidate, time_candidate, h.device)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float,
    backend: str = "auto",
    stats: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over targets != -100, {max |logit|, mean lse²}) for h (N, d), weight (V, d); without
    ``stats`` the statistics may be {} (a backend that has none)."""
    choice = readout_backend(backend, h, weight, stats)
    return run_readout(choice, h, weight, targets, logit_scale=logit_scale, stats=stats and choice != "liger")


# ------------------------------------------------------------------ checking and timing a candidate ---------
def _inputs(key: ReadoutKey, device: torch.device):
    """h, W (requiring grad; logits of unit scale at logit_scale CHECK_SCALE) and targets, a tenth ignored."""
    g = dispatch.generator(device)
    dtype = getattr(torch, key.dtype)
    h = torch.randn(key.rows, key.hidden, generator=g, device=device, dtype=dtype)
    w = torch.randn(key.vocab, key.hidden, generator=g, device=device) / (CHECK_SCALE * key.hidden**0.5)
    t = torch.randint(0, key.vocab, (key.rows,), generator=g, device=device)
    ignored = torch.rand(key.rows, generator=g, device=device) < 0.1
    return h.requires_grad_(), w.to(dtype).requires_grad_(), t.masked_fill(ignored, -100)


def _loss_and_grads(name: str, h, w, t, stats: bool) -> dict[str, torch.Tensor]:
    loss, st = run_readout(name, h, w, t, logit_scale=CHECK_SCALE, stats=stats)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return {"loss": loss, "dh": dh, "dW": dw, **(st if stats else {})}


def check_candidate(name: str, key: ReadoutKey, *, device: torch.device | None = None) -> str | None:
    """None when ``name`` gives the loss, its gradients (and the statistics, when the key needs them) within
    the dtype's tolerance of the chunked torch readout in fp32 (fp64 for fp32 inputs), else why not."""
    device = device or dispatch._current_device()
    h, w, t = _inputs(key, device)
    with dispatch.measuring(device):
        got = _loss_and_grads(name, h, w, t, key.stats)
        ref_dtype = dispatch.reference_dtype(h.dtype)
        h_ref, w_ref = (x.detach().to(ref_dtype).requires_grad_() for x in (h, w))
        ref = _loss_and_grads("torch", h_ref, w_ref, t, key.stats)
    return dispatch.mismatch(got, ref, dispatch.tolerance(key.dtype))


def time_candidate(name: str, key: ReadoutKey, *, device: torch.device | None = None) -> float:
    """Median milliseconds of the loss's forward and backward by ``name`` at this shape."""
    device = device or dispatch._current_device()
    h, w, t = _inputs(key, device)
    with dispatch.measuring(device):
        return dispatch.cuda_ms(lambda: _loss_and_grads(name, h, w, t, key.stats), device)


def environment_versions() -> dict[str, str]:
    return {
        **dispatch.base_versions(),
        "liger_kernel": dispatch.package_version("liger-kernel", "liger_kernel"),
        "mupfast_cross_entropy_kernel": dispatch.source_hash("mupfast.kernels.cross_entropy"),
    }


class ReadoutDispatcher(Dispatcher):
    """The readout's :class:`~mupfast.ops.dispatch.Dispatcher`: Liger only for a key without statistics."""

    def __init__(self, **kw):
        super().__init__(
            "readout", CANDIDATES, fallback="triton", versions_fn=environment_versions, logger=log, **kw
        )

    def candidates_for(self, key: ReadoutKey) -> tuple[str, ...]:
        return tuple(n for n in self.candidates if n in STATS_CANDIDATES or not key.stats)


_DEFAULT = ReadoutDispatcher()


def default_dispatcher() -> ReadoutDispatcher:
    """The dispatcher ``readout_backend`` uses (one per process)."""
    return _DEFAULT
