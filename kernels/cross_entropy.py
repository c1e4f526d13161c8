"""Fused μP readout: ``mean CE(softmax(logit_scale · h Wᵀ)) + z_loss · lse²`` without N×V logits.

Design (the chunking of Liger-Kernel's fused linear cross-entropy): the tokens are processed in
chunks. Per chunk, one GEMM writes the raw logits ``h_c Wᵀ`` into a reusable (chunk, V) buffer;
a Triton row kernel scales them by ``logit_scale`` in fp32, computes an online log-sum-exp, the
per-row loss and monitoring statistics, and overwrites the buffer in place with

    g_i = logit_scale · ((1 + 2·z_loss·lse) · softmax_i − [i = y])      (0 for ignored rows)

Two more GEMMs turn g into ``dh_c = g W`` and ``dW += gᵀ h_c`` (dW accumulated in fp32). The
gradients are therefore computed during the forward and only multiplied by ``grad_output`` in the
backward. The 1/n_valid factor is applied to dh/dW after the GEMMs (not to g), so fp16/bf16 g does
not underflow. Peak extra memory is O(chunk × V + V × d), never O(N × V).

``logit_scale`` and ``z_loss`` are runtime kernel arguments (no recompiles); n_valid stays a device
tensor, so nothing here synchronises with the host. Where Triton cannot run (CPU without
``TRITON_INTERPRET=1``) the same chunk driver runs with a PyTorch row op of the same contract.

The buffer's rows are padded to a multiple of 64 elements and the row kernel runs whole vocabulary
blocks unmasked, so its loads and stores are 128-bit on a GPU whatever V is. The public function calls
the driver through the operator ``torch.ops.mupfast.fused_linear_cross_entropy`` (fake implementation
and autograd formula registered), which torch.compile and activation checkpointing trace as one node.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .runtime import INTERPRET, LAUNCH, triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERP_R, _INTERP_V = 64, 2048  # interpreter blocks: it pays per op, so few big programs
_REFERENCE_CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk of the PyTorch reference
_VOCAB_ALIGN = 64  # the logits buffer's row stride is padded to this many elements


def padded_vocab(V: int) -> int:
    """Row stride of the (chunk, V) logits buffer: V rounded up to a multiple of 64 elements. With an odd
    V (GPT-2's 50,257) every row but the first starts misaligned and the row kernel's loads and stores are
    scalar; with the stride padded, rows start 128-byte aligned (16-bit) and Triton, which specialises
    strides divisible by 16, emits 128-bit accesses. The padding columns are never read or written."""
    return -(-V // _VOCAB_ALIGN) * _VOCAB_ALIGN


def row_blocks(V: int, block_v: int | None = None) -> tuple[int, int, int]:
    """(rows per program, vocabulary block, num_warps) of the row kernel for a vocabulary of V."""
    if INTERPRET:  # the interpreter pays per op: few big programs
        return _INTERP_R, block_v or min(triton.next_power_of_2(V), _INTERP_V), 1
    block_v = block_v or min(triton.next_power_of_2(V), 4096)
    return 1, block_v, 8 if block_v >= 2048 else 4


if triton is not None:

    @triton.jit
    def _lse_block(x_row, cols, row_ok, V, scale, m, s, amax, MASK_COLS: tl.constexpr):
        """Online max / sum-exp and max |x| over one block of columns; full blocks load unmasked along the
        vocabulary (the row mask is constant along it), so the loads vectorise."""
        if MASK_COLS:
            col_ok = cols[None, :] < V
            x = tl.load(x_row + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
            x = x * scale
            amax = tl.maximum(amax, tl.max(tl.where(col_ok, tl.abs(x), 0.0), axis=1))
            x = tl.where(col_ok, x, float("-inf"))
        else:
            x = tl.load(x_row + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * scale
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        return m_new, s, amax

    @triton.jit
    def _grad_block(x_row, cols, row_ok, V, scale, lse, coef, hit, t_safe, MASK_COLS: tl.constexpr):
        """g = coef · softmax − hit · onehot over one block of columns, written over the logits."""
        if MASK_COLS:
            mask = row_ok[:, None] & (cols[None, :] < V)
        else:
            mask = row_ok[:, None]
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale
        g = coef[:, None] * tl.exp(x - lse[:, None])
        g = g - tl.where(cols[None, :] == t_safe[:, None], hit[:, None], 0.0)
        tl.store(x_row + cols[None, :], g.to(x_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_rows_kernel(
        X, stride_x, T, LOSS, LSE, MAXABS, n_rows, V, scale, z_loss, ignore_index,
        WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_R rows per program: loss, lse, max|x| per row; g written over the logits in place.
        The whole vocabulary blocks run unmasked, the ragged last one masked: the same arithmetic per
        block as one masked loop, so the results are bitwise those of a single masked loop."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        t = tl.load(T + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (t != ignore_index)
        t_safe = tl.where(valid & (t >= 0) & (t < V), t, 0)
        x_row = X + rows.to(tl.int64)[:, None] * stride_x
        cols0 = tl.arange(0, BLOCK_V)
        v_full = (V // BLOCK_V) * BLOCK_V
        # The target logit is read before pass 2 overwrites the row with its gradient: loaded here, and
        # ordered before every warp's stores by the barrier below. Read after pass 1 without one, another
        # warp could already have written g over it (the interpreter runs in lock-step and never shows it).
        x_t = tl.load(X + rows.to(tl.int64) * stride_x + t_safe, mask=valid, other=0.0).to(tl.float32)

        # Pass 1: online max / sum-exp of the scaled logits, and max |x|.
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        amax = tl.zeros([BLOCK_R], tl.float32)
        for v0 in range(0, v_full, BLOCK_V):
            m, s, amax = _lse_block(x_row, v0 + cols0, row_ok, V, scale, m, s, amax, False)
        if v_full < V:
            m, s, amax = _lse_block(x_row, v_full + cols0, row_ok, V, scale, m, s, amax, True)
        lse = m + tl.log(s)
        loss = lse - x_t * scale + z_loss * lse * lse
        tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_ok)
        tl.store(LSE + rows, tl.where(valid, lse, 0.0), mask=row_ok)
        tl.store(MAXABS + rows, tl.where(valid, amax, 0.0), mask=row_ok)

        # Pass 2: g = scale · ((1 + 2 z lse) softmax − onehot), zero on ignored rows, in place.
        if WRITE_GRAD:
            tl.debug_barrier()  # every warp's reads of the row (x_t included) before any gradient store
            coef = tl.where(valid, (1.0 + 2.0 * z_loss * lse) * scale, 0.0)
            hit = tl.where(valid, scale, 0.0)
            for v0 in range(0, v_full, BLOCK_V):
                _grad_block(x_row, v0 + cols0, row_ok, V, scale, lse, coef, hit, t_safe, False)
            if v_full < V:
                _grad_block(x_row, v_full + cols0, row_ok, V, scale, lse, coef, hit, t_safe, True)


def _rows_triton(x, t, loss, lse, amax, scale, z_loss, ignore_index, write_grad, block_v=None):
    n_rows, V = x.shape
    block_r, block_v, warps = row_blocks(V, block_v)
    grid = (triton.cdiv(n_rows, block_r),)
    _ce_rows_kernel[grid](
        x, x.stride(0), t, loss, lse, amax, n_rows, V, float(scale), float(z_loss), int(ignore_index),
        WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps, **LAUNCH,
    )  # fmt: skip


def _rows_torch(x, t, loss, lse, amax, scale, z_loss, ignore_index, write_grad, block_v=None):
    """PyTorch stand-in for the row kernel, same contract (used where Triton cannot run)."""
    V = x.shape[1]
    valid = t != ignore_index
    t_safe = torch.where(valid & (t >= 0) & (t < V), t, 0)
    xs = x.float().mul_(scale)  # is x itself when fp32: the chunk buffer is scratch space
    lse_c = torch.logsumexp(xs, dim=1)
    x_t = xs.gather(1, t_safe[:, None])[:, 0]
    loss.copy_(torch.where(valid, lse_c - x_t + z_loss * lse_c * lse_c, 0.0))
    lse.copy_(torch.where(valid, lse_c, 0.0))
    amax.copy_(torch.where(valid, xs.abs().amax(dim=1), 0.0))
    if write_grad:
        coef = torch.where(valid, (1.0 + 2.0 * z_loss * lse_c) * scale, 0.0)
        g = xs.sub_(lse_c[:, None]).exp_().mul_(coef[:, None])
        g.scatter_add_(1, t_safe[:, None], -torch.where(valid, scale, 0.0)[:, None])
        x.copy_(g)


_ADDMM_OUT_DTYPE_OK: dict[tuple, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without an fp32 (V, d) temporary where cuBLAS allows it."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (a.device.type, a.dtype)
    if a.is_cuda and _ADDMM_OUT_DTYPE_OK.get(key, True):
        try:  # torch ≥ 2.8: fp16/bf16 GEMM with fp32 output and fp32 accumulate (CUDA only)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE_OK[key] = False
    acc.add_(torch.mm(a, b))  # per-chunk product rounded once to the input dtype, summed in fp32


def _chunk_rows(N: int, V: int, d: int) -> int:
    """Liger's heuristic: the (chunk, V) buffer holds about as many elements as h; ≥ 128 rows."""
    chunks = max(1, -(-V // d))
    rows = 1 << max(0, (-(-N // chunks) - 1).bit_length())
    return max(1, min(N, max(rows, 128)))


def _validate(h, W, targets, logit_scale, z_loss, dtypes):
    if h.dim() != 2 or W.dim() != 2:
        raise ValueError(f"h must be (N, d) and W (V, d); got h {tuple(h.shape)}, W {tuple(W.shape)}")
    if h.shape[1] != W.shape[1]:
        raise ValueError(f"hidden sizes differ: h {tuple(h.shape)} vs W {tuple(W.shape)}")
    if targets.dim() != 1 or targets.shape[0] != h.shape[0]:
        raise ValueError(f"targets must be ({h.shape[0]},); got {tuple(targets.shape)}")
    if h.shape[0] == 0 or W.shape[0] == 0:
        raise ValueError("empty input: need N ≥ 1 tokens and V ≥ 1 classes")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32); got {targets.dtype}")
    if h.dtype != W.dtype or h.dtype not in dtypes:
        raise ValueError(f"h and W must share one dtype of {dtypes}; got {h.dtype} and {W.dtype}")
    if not (h.device == W.device == targets.device):
        raise ValueError(
            f"h, W and targets must be on one device; got {h.device}, {W.device}, {targets.device}"
        )
    if not (abs(float(logit_scale)) < float("inf")) or not (0.0 <= float(z_loss) < float("inf")):
        raise ValueError(f"logit_scale must be finite and z_loss finite and ≥ 0; got {logit_scale}, {z_loss}")


def _fused_forward(
    h, W, targets, scale, z_loss, ignore_index, need_dh, need_dW, chunk_size, block_v, use_triton
):
    """The chunk driver. Returns loss, dh, dW (already divided by n_valid), max|x|, mean lse²."""
    N, d = h.shape
    V = W.shape[0]
    row_op = _rows_triton if use_triton else _rows_torch
    chunk = chunk_size or _chunk_rows(N, V, d)
    write_grad = need_dh or need_dW
    full = torch.empty(min(chunk, N), padded_vocab(V), dtype=h.dtype, device=h.device)
    # The padding columns are zeroed once: PyTorch's CPU bf16 GEMM reads them when x (row stride > V) is
    # the left operand of x @ W (for dh), so uninitialised NaN bits there made whole rows of dh NaN.
    full[:, V:].zero_()
    buf = full[:, :V]
    row_loss, row_lse, row_amax = (torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(3))
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None
    dW = torch.zeros(V, d, dtype=torch.float32, device=h.device) if need_dW else None
    inv_n = 1.0 / (targets != ignore_index).sum().clamp_min(1).to(torch.float32)  # device tensor
    Wt = W.t()
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        x, h_c = buf[: c1 - c0], h[c0:c1]
        torch.mm(h_c, Wt, out=x)
        row_op(x, targets[c0:c1], row_loss[c0:c1], row_lse[c0:c1], row_amax[c0:c1],
               scale, z_loss, ignore_index, write_grad, block_v)  # fmt: skip
        if need_dh:
            torch.mm(x, W, out=dh[c0:c1])
        if need_dW:
            _accumulate_mm(dW, x.t(), h_c)
    if need_dh:
        dh.mul_(inv_n)
    if need_dW:
        dW = dW.mul_(inv_n).to(W.dtype)
    loss = row_loss.sum() * inv_n
    return loss, dh, dW, row_amax.max(), row_lse.square().sum() * inv_n


# torch.ops.mupfast.fused_linear_cross_entropy: one opaque graph node for torch.compile and checkpointing.
# An opaque custom_op, not a triton_op: its body is a host loop over chunks reusing one logits buffer in
# place, which functionalisation would turn into a copy per chunk; opaque, it runs as in eager, memory and
# all. The gradients are computed in the forward; unneeded ones come back as empty (0,) tensors.
@torch.library.custom_op("mupfast::fused_linear_cross_entropy", mutates_args=())
def _fused_op(h: Tensor, W: Tensor, targets: Tensor, scale: float, z_loss: float, ignore_index: int,
              need_dh: bool, need_dW: bool, chunk_size: int | None, block_v: int | None,
              use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    with torch.cuda.device(h.device) if h.is_cuda else contextlib.nullcontext():
        loss, dh, dW, max_abs, lse_sq = _fused_forward(
            h, W, targets, scale, z_loss, ignore_index, need_dh, need_dW, chunk_size, block_v, use_triton
        )
    return loss, h.new_empty(0) if dh is None else dh, W.new_empty(0) if dW is None else dW, max_abs, lse_sq


@_fused_op.register_fake
def _fused_op_fake(
    h, W, targets, scale, z_loss, ignore_index, need_dh, need_dW, chunk_size, block_v, use_triton
):
    scalar = lambda: h.new_empty((), dtype=torch.float32)
    dh = h.new_empty(h.shape if need_dh else (0,))
    dW = W.new_empty(W.shape if need_dW else (0,))
    return scalar(), dh, dW, scalar(), scalar()


def _fused_setup_context(ctx, inputs, output):
    _loss, dh, dW, max_abs, lse_sq = output
    ctx.need = inputs[6], inputs[7]  # need_dh, need_dW
    ctx.save_for_backward(dh, dW)
    ctx.mark_non_differentiable(dh, dW, max_abs, lse_sq)


def _fused_backward(ctx, grad_loss, *_unused):
    dh, dW = ctx.saved_tensors
    grad_h = dh * grad_loss if ctx.need[0] else None
    grad_W = dW * grad_loss if ctx.need[1] else None
    return grad_h, grad_W, None, None, None, None, None, None, None, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def fused_linear_cross_entropy(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over targets ≠ ignore_index of CE(softmax(logit_scale·h Wᵀ)) + z_loss·lse², fp32 scalar.

    h (N, d), W (V, d) of one dtype (fp32/fp16/bf16), targets (N,) int64. The N×V logits are
    never materialised. With ``return_stats`` also returns ``{"max_abs_logit", "lse_sq_mean"}``
    (0-dim fp32 device tensors over valid rows, no host sync). All targets ignored → loss 0.
    """
    return _fused(h, W, targets, logit_scale, z_loss, ignore_index, return_stats)


def _fused(
    h,
    W,
    targets,
    logit_scale,
    z_loss,
    ignore_index,
    return_stats,
    chunk_size=None,
    block_v=None,
    use_triton=None,
):
    """fused_linear_cross_entropy with the chunk/block heuristics and the row op overridable (tests)."""
    _validate(h, W, targets, logit_scale, z_loss, _DTYPES)
    if use_triton is None:
        use_triton = triton is not None and triton_usable(h, W, targets)
    grad = torch.is_grad_enabled()
    loss, _dh, _dW, max_abs, lse_sq = _fused_op(
        h, W, targets, float(logit_scale), float(z_loss), int(ignore_index), grad and h.requires_grad,
        grad and W.requires_grad, chunk_size, block_v, bool(use_triton),
    )  # fmt: skip
    if return_stats:
        return loss, {"max_abs_logit": max_abs, "lse_sq_mean": lse_sq}
    return loss


def _reference_rows(h_c, W, t_c, scale, z_loss, ignore_index):
    acc = torch.promote_types(h_c.dtype, torch.float32)
    logits = F.linear(h_c, W).to(acc) * scale
    lse = torch.logsumexp(logits, dim=1)
    valid = t_c != ignore_index
    x_t = logits.gather(1, torch.where(valid, t_c, 0)[:, None])[:, 0]
    loss = torch.where(valid, lse - x_t + z_loss * lse.square(), 0.0).sum()
    with torch.no_grad():
        max_abs = torch.where(valid, logits.abs().amax(dim=1), 0.0).amax()
        lse_sq = torch.where(valid, lse.square(), 0.0).sum()
    return loss, max_abs, lse_sq


def linear_cross_entropy_reference(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain-PyTorch version of :func:`fused_linear_cross_entropy` (same contract; also float64).

    Chunked over tokens; with autograd on, each chunk is checkpointed (recomputed in the
    backward), so at most one chunk of logits is alive at a time.
    """
    _validate(h, W, targets, logit_scale, z_loss, (*_DTYPES, torch.float64))
    N, V = h.shape[0], W.shape[0]
    rows = max(1, _REFERENCE_CHUNK_ELEMENTS // V)
    recompute = rows < N and torch.is_grad_enabled() and (h.requires_grad or W.requires_grad)
    parts = []
    for c0 in range(0, N, rows):
        args = (
            h[c0 : c0 + rows],
            W,
            targets[c0 : c0 + rows],
            float(logit_scale),
            float(z_loss),
            ignore_index,
        )
        parts.append(
            checkpoint(_reference_rows, *args, use_reentrant=False) if recompute else _reference_rows(*args)
        )
    n_valid = (targets != ignore_index).sum().clamp_min(1)
    loss = torch.stack([p[0] for p in parts]).sum() / n_valid
    if not return_stats:
        return loss
    stats = {
        "max_abs_logit": torch.stack([p[1] for p in parts]).amax().float(),
        "lse_sq_mean": (torch.stack([p[2] for p in parts]).sum() / n_valid).float(),
    }
    return loss, stats
