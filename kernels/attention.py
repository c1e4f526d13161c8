"""μP flash attention: o = softmax(scale·QKᵀ)·V with a runtime ``scale`` (α/d_head under μP, 1/√d under SP).

Forward: one program per (query block, batch·query head); an exp2-domain online softmax over key blocks,
causal split into off-diagonal blocks (no mask) and the diagonal block (masked); saves the log-sum-exp.
Document masking (``doc_ids``, packed pretraining rows): query t sees keys doc_start(t) ≤ s ≤ t. Each kernel
gets per-position int32 ``doc_start``/``doc_end`` and a ``DOC`` constexpr; key (or query) tiles wholly outside
a block's documents are skipped — never loaded — so cost falls with document length; only the tiles that
straddle a document boundary, and the diagonal, are masked. ``DOC=False`` compiles the plain causal code.
Backward, deterministic and without atomics: a preprocess kernel δ = rowsum(O∘dO); a dK/dV kernel with one
program per (key block, batch·kv head) that loops over the query heads sharing that kv head (GQA/MQA);
and a separate dQ kernel. Any T (masked tails), head dims up to 256 (padded to a power of two), fp16, bf16
and fp32 inputs with fp32 accumulation.

``mup_attention`` calls the operators ``torch.ops.mupfast.attention_fwd`` / ``attention_bwd`` (fake
implementations and the autograd formula registered): ``triton_op``s where Triton compiles, so torch.compile
traces them without a graph break and inductor sees the kernels; opaque ``custom_op``s under the interpreter.
Autotuning configs and their per-target pruning: attention_tuning.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mupfast.kernels import attention_tuning as tuning
from mupfast.kernels.runtime import LAUNCH, kernel_op, triton_usable, wrap_triton

__all__ = ["mup_attention", "attention_reference", "skipped_tiles"]

_LN2 = math.log(2.0)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp32 inputs get IEEE fp32 dots (TF32 would err by ~1e-3): exact but on FMA units, so an fp32 call is for
# checks and coordinate checks, not speed. 3-pass TF32 was tried: it needs up to twice the shared memory
# and no config fit at D = 256. 16-bit inputs ignore this setting.
_FP32_DOT = "ieee"


# ---------------------------------------------------------------- autotuning ----------------------------
# Configs and pruners per target: attention_tuning.py. Resident tiles: forward Q; dK/dV K, V; dQ Q, dO.
_FWD_CONFIGS = tuning.configs("BLOCK_M", "BLOCK_N", tuning.FWD)
_FWD_PRUNE = tuning.pruner("BLOCK_M", "BLOCK_N", 1, tuning.FWD)
_DKDV_CONFIGS = tuning.configs("BLOCK_N1", "BLOCK_M1", tuning.DKDV)
_DKDV_PRUNE = tuning.pruner("BLOCK_N1", "BLOCK_M1", 2, tuning.DKDV)
_DQ_CONFIGS = tuning.configs("BLOCK_M2", "BLOCK_N2", tuning.DQ)
_DQ_PRUNE = tuning.pruner("BLOCK_M2", "BLOCK_N2", 2, tuning.DQ)
_KEY = ["T", "HEAD_D", "CAUSAL", "DOC"]
# A dK/dV program loops over the GROUP query heads of its kv head: its work, and so its best tile,
# changes with the GQA group (forward and dQ programs do one head's work whatever the group).
_DKDV_KEY = [*_KEY, "GROUP"]
PREPROCESS_BLOCK_M = 64  # δ = rowsum(O∘dO): one fixed block, no autotuning
PREPROCESS_LAUNCH = {"num_warps": 4, **LAUNCH}


# ---------------------------------------------------------------- kernels -------------------------------
@triton.jit
def _load_tile(ptrs, rows, T, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; the sequence tail is masked only when asked, D only when it is padded."""
    if MASK_ROWS:
        return tl.load(ptrs, mask=(rows[:, None] < T) & (offs_d[None, :] < HEAD_D), other=0.0)
    elif HEAD_D == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)


@triton.jit
def _doc_key_range(dstart, row_ok, diag, BLOCK_N: tl.constexpr):
    """Key range of a query block under document masking: keys before ``lo`` (its first row's document start,
    rounded down to a key block) are skipped; [lo, lo_full) is masked; [lo_full, diag) needs no mask, being
    at or after every row's document start and left of the diagonal block at ``diag``."""
    first = tl.min(tl.where(row_ok, dstart, diag), 0)  # doc_start is nondecreasing: the first row's
    last = tl.max(tl.where(row_ok, dstart, 0), 0)  # and the last valid row's
    lo = (first // BLOCK_N) * BLOCK_N
    lo_full = tl.minimum(tl.cdiv(last, BLOCK_N) * BLOCK_N, diag)
    return lo, lo_full


@triton.jit
def _skip_gap(start, gap_at, gap, JUMP: tl.constexpr):
    """With document masking one masked loop runs the blocks that straddle document starts and then the
    diagonal ones, jumping the unmasked blocks between them: one loop fewer, 10-30 registers fewer on sm_90"""
    if JUMP:
        return start + tl.where(start >= gap_at, gap, 0)
    else:
        return start


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, offs_m, offs_n0, offs_d, dstart, lo, hi, gap_at,
               gap, T, qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    for start in range(lo, hi, BLOCK_N):
        start_n = _skip_gap(start, gap_at, gap, MASKED and DOC)
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs + start_n * stride_kt, offs_n, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # the one fp32 scale multiply
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            if DOC:  # a row masked in a whole tile gets p = 0, or (no key kept yet) is reset by alpha = 0
                keep = keep & (offs_n[None, :] >= dstart[:, None])
            s = tl.where(keep, s, -1.0e30)  # finite: a fully masked (padding) row gives no NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + start_n * stride_kt, offs_n, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by=_FWD_PRUNE)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DS, DE, scale, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, H, GROUP, T,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(CAUSAL or not DOC)
    start_m, bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:  # the longest rows (last query blocks) first: a shorter tail of stragglers
        start_m = tl.num_programs(0) - 1 - start_m
    b, h = bh // H, bh % H
    q_off = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    kv_off = b.to(tl.int64) * s_kb + (h // GROUP).to(tl.int64) * s_kh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(
        Q + q_off + offs_m[:, None] * s_qt + offs_d[None, :], offs_m, T, offs_d, HEAD_D, BLOCK_D, True
    )
    k_ptrs = K + kv_off + offs_n[:, None] * s_kt + offs_d[None, :]
    v_ptrs = V + kv_off + offs_n[:, None] * s_kt + offs_d[None, :]
    qk_scale = scale * 1.4426950408889634  # log2(e): softmax in the exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # blocks left of the diagonal need no mask; the diagonal block does
        lo_masked = start_m * BLOCK_M
        hi_masked = tl.minimum(lo_masked + BLOCK_M, T)
    else:  # whole key blocks need no mask; the ragged tail does
        lo_masked = (T // BLOCK_N) * BLOCK_N
        hi_masked = T
    if DOC:  # keys before the block's first document are skipped; [lo, lo_full) straddles document starts
        dstart = tl.load(DS + b.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0)
        lo, lo_full = _doc_key_range(dstart, offs_m < T, lo_masked, BLOCK_N)
        gap = lo_masked - lo_full  # masked: [lo, lo_full) then the diagonal [lo_masked, hi_masked)
        lo_m, hi_m = lo, hi_masked - gap
    else:
        dstart, lo_full, gap = offs_m, 0, 0  # dstart and gap unused
        lo_m, hi_m = lo_masked, hi_masked
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, s_kt, offs_m, offs_n, offs_d, dstart,
                               lo_full, lo_masked, lo_full, gap, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, False,
                               CAUSAL, DOC, PRECISION)  # fmt: skip
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, s_kt, offs_m, offs_n, offs_d, dstart, lo_m,
                               hi_m, lo_full, gap, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_N, True, CAUSAL, DOC,
                               PRECISION)  # fmt: skip
    o = acc / l_i[:, None]
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)  # log2 domain
    o_ptrs = O + q_off + offs_m[:, None] * s_qt + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D))


@triton.jit
def _bwd_preprocess(O, DO, DELTA, s_qb, s_qh, s_qt, H, T,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    start_m, bh = tl.program_id(0), tl.program_id(1)
    off = (bh // H).to(tl.int64) * s_qb + (bh % H).to(tl.int64) * s_qh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = off + offs_m[:, None] * s_qt + offs_d[None, :]
    o = _load_tile(O + ptrs, offs_m, T, offs_d, HEAD_D, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO + ptrs, offs_m, T, offs_d, HEAD_D, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, dstart_ptr, stride_qt, offs_n, offs_m0,
                offs_d, lo, hi, T, qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M1: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M1):
        offs_m = start_m + offs_m0
        q = _load_tile(q_ptrs + start_m * stride_qt, offs_m, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        do = _load_tile(do_ptrs + start_m * stride_qt, offs_m, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            keep = offs_m[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            if DOC:
                dstart = tl.load(dstart_ptr + offs_m, mask=offs_m < T, other=0)
                keep = keep & (offs_n[:, None] >= dstart[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_DKDV_KEY, prune_configs_by=_DKDV_PRUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DS, DE, scale, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, H,
                   GROUP, T, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   DOC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N1: tl.constexpr,
                   BLOCK_M1: tl.constexpr):  # fmt: skip
    tl.static_assert(BLOCK_N1 % BLOCK_M1 == 0)
    tl.static_assert(CAUSAL or not DOC)
    start_n, bhk = tl.program_id(0), tl.program_id(1)
    hkv_count = H // GROUP
    b, hk = bhk // hkv_count, bhk % hkv_count
    kv_off = b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    n0 = start_n * BLOCK_N1
    offs_n = n0 + tl.arange(0, BLOCK_N1)
    offs_m0 = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ptrs = kv_off + offs_n[:, None] * s_kt + offs_d[None, :]
    k = _load_tile(K + kv_ptrs, offs_n, T, offs_d, HEAD_D, BLOCK_D, True)
    v = _load_tile(V + kv_ptrs, offs_n, T, offs_d, HEAD_D, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    if CAUSAL:  # query rows above this key block see none of it; the diagonal block is masked
        lo = n0 + BLOCK_N1
        hi_diag = tl.minimum(lo, T)
    else:
        lo = 0
        hi_diag = 0
    if DOC:  # queries past the end of the last key's document see none of this block (skipped); every pair
        # is valid up to the end of the first key's document (unmasked); the rest is masked
        de_ptr = DE + b.to(tl.int64) * T
        hi = tl.load(de_ptr + tl.minimum(n0 + BLOCK_N1, T) - 1) + 1
        hi_full = lo + (tl.maximum(tl.load(de_ptr + n0) + 1 - lo, 0) // BLOCK_M1) * BLOCK_M1
        dstart_ptr = DS + b.to(tl.int64) * T
    else:
        hi = T
        hi_full = lo + (tl.maximum(T - lo, 0) // BLOCK_M1) * BLOCK_M1
        dstart_ptr = DS  # unused
    for g in range(GROUP):  # the query heads that share this kv head: no atomics, deterministic
        h = hk * GROUP + g
        q_off = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        q_ptrs = Q + q_off + offs_m0[:, None] * s_qt + offs_d[None, :]
        do_ptrs = DO + q_off + offs_m0[:, None] * s_qt + offs_d[None, :]
        row = (b * H + h).to(tl.int64) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row, DELTA + row, dstart_ptr, s_qt, offs_n,
                             offs_m0, offs_d, n0, hi_diag, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_M1, True,
                             CAUSAL, DOC, PRECISION)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row, DELTA + row, dstart_ptr, s_qt, offs_n,
                             offs_m0, offs_d, lo, hi_full, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_M1, False,
                             CAUSAL, DOC, PRECISION)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE + row, DELTA + row, dstart_ptr, s_qt, offs_n,
                             offs_m0, offs_d, hi_full, hi, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_M1, True,
                             False, DOC, PRECISION)  # fmt: skip
    mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_D)
    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, offs_m, offs_n0, offs_d, dstart, lo, hi,
              gap_at, gap, T, qk_scale, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N2: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
              PRECISION: tl.constexpr):  # fmt: skip
    for start in range(lo, hi, BLOCK_N2):
        start_n = _skip_gap(start, gap_at, gap, MASKED and DOC)
        offs_n = start_n + offs_n0
        k = _load_tile(k_ptrs + start_n * stride_kt, offs_n, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        v = _load_tile(v_ptrs + start_n * stride_kt, offs_n, T, offs_d, HEAD_D, BLOCK_D, MASKED)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            if DOC:
                keep = keep & (offs_n[None, :] >= dstart[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by=_DQ_PRUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, DS, scale, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, H, GROUP, T,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOC: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):  # fmt: skip
    tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0)
    tl.static_assert(CAUSAL or not DOC)
    start_m, bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:  # the longest rows (last query blocks) first: a shorter tail of stragglers
        start_m = tl.num_programs(0) - 1 - start_m
    b, h = bh // H, bh % H
    q_off = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    kv_off = b.to(tl.int64) * s_kb + (h // GROUP).to(tl.int64) * s_kh
    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_n = tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = q_off + offs_m[:, None] * s_qt + offs_d[None, :]
    q = _load_tile(Q + q_ptrs, offs_m, T, offs_d, HEAD_D, BLOCK_D, True)
    do = _load_tile(DO + q_ptrs, offs_m, T, offs_d, HEAD_D, BLOCK_D, True)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_ptrs = K + kv_off + offs_n[:, None] * s_kt + offs_d[None, :]
    v_ptrs = V + kv_off + offs_n[:, None] * s_kt + offs_d[None, :]
    qk_scale = scale * 1.4426950408889634
    if CAUSAL:
        lo_masked = start_m * BLOCK_M2
        hi_masked = tl.minimum(lo_masked + BLOCK_M2, T)
    else:
        lo_masked = (T // BLOCK_N2) * BLOCK_N2
        hi_masked = T
    dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
    if DOC:  # the forward's key ranges: skipped, unmasked, then masked (straddling, diagonal) in one loop
        dstart = tl.load(DS + b.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0)
        lo, lo_full = _doc_key_range(dstart, offs_m < T, lo_masked, BLOCK_N2)
        gap = lo_masked - lo_full
        lo_m, hi_m = lo, hi_masked - gap
    else:
        dstart, lo_full, gap = offs_m, 0, 0  # dstart and gap unused
        lo_m, hi_m = lo_masked, hi_masked
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, s_kt, offs_m, offs_n, offs_d, dstart, lo_full,
                   lo_masked, lo_full, gap, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_N2, False, CAUSAL, DOC,
                   PRECISION)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, s_kt, offs_m, offs_n, offs_d, dstart, lo_m, hi_m,
                   lo_full, gap, T, qk_scale, HEAD_D, BLOCK_D, BLOCK_N2, True, CAUSAL, DOC,
                   PRECISION)  # fmt: skip
    tl.store(
        DQ + q_ptrs,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=(offs_m[:, None] < T) & (offs_d[None, :] < HEAD_D),
    )


# ---------------------------------------------------------------- launchers -----------------------------
def _dense(t: torch.Tensor) -> torch.Tensor:
    """Keep (B,H,T,D)- and (B,T,H,D)-contiguous layouts as they are (strides go to the kernels); copy others."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of ``ref``, so one set of strides serves both."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, doc: bool) -> dict:
    d = q.shape[-1]
    return {
        "H": q.shape[1], "GROUP": q.shape[1] // k.shape[1], "T": q.shape[2], "HEAD_D": d,
        "BLOCK_D": max(16, triton.next_power_of_2(d)), "CAUSAL": causal, "DOC": doc,
        "PRECISION": _FP32_DOT,  # how fp32 dots run; 16-bit inputs ignore it
    }  # fmt: skip


def _doc_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (B, T) ``doc_start``/``doc_end``: the first and last index of each position's run of equal ids.
    Two scans over the row (cummax forwards, cummin backwards): O(B·T), on the ids' device, no host sync."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    edge = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    start = torch.where(torch.cat([edge, change], 1), idx, 0).cummax(1).values
    end = torch.where(torch.cat([change, edge], 1), idx, T - 1).flip(1).cummin(1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _forward(q, k, v, ds, de, scale: float, causal: bool):
    B, H, T, _ = q.shape
    o = torch.empty_like(q)
    lse2 = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    meta = _meta(q, k, causal, ds is not None)
    wrap_triton(_attn_fwd)[grid](
        q, k, v, o, lse2, ds, de, scale, *q.stride()[:3], *k.stride()[:3], **meta, **LAUNCH
    )
    return o, lse2


def _backward(do, q, k, v, o, lse2, ds, de, scale: float, causal: bool):
    B, H, T, _ = q.shape
    meta = _meta(q, k, causal, ds is not None)
    do = _like(do, o)
    delta = torch.empty_like(lse2)
    wrap_triton(_bwd_preprocess)[(triton.cdiv(T, PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *q.stride()[:3], H, T, HEAD_D=meta["HEAD_D"], BLOCK_D=meta["BLOCK_D"],
        BLOCK_M=PREPROCESS_BLOCK_M, **PREPROCESS_LAUNCH,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
    strides = (*q.stride()[:3], *k.stride()[:3])
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N1"]), B * k.shape[1])
    wrap_triton(_attn_bwd_dkdv)[grid](
        q, k, v, do, dk, dv, lse2, delta, ds, de, scale, *strides, **meta, **LAUNCH
    )
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M2"]), B * H)
    wrap_triton(_attn_bwd_dq)[grid](q, k, v, do, dq, lse2, delta, ds, scale, *strides, **meta, **LAUNCH)
    return dq, dk, dv


def _on(device: torch.device):
    """Launch on the tensors' GPU even when another one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------- operators -----------------------------
# torch.ops.mupfast.attention_fwd / attention_bwd: one graph node each for torch.compile and checkpointing.
# lse2 is the log2-domain log-sum-exp the backward needs; doc_start/doc_end are _doc_bounds(doc_ids) or None.
@kernel_op("mupfast::attention_fwd")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None, doc_end: Tensor | None,
                   scale: float, causal: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    with _on(q.device):
        return _forward(q, k, v, doc_start, doc_end, scale, causal)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, doc_start, doc_end, scale, causal):
    B, H, T, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@kernel_op("mupfast::attention_bwd")
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse2: Tensor,
                   doc_start: Tensor | None, doc_end: Tensor | None, scale: float,
                   causal: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    with _on(q.device):
        return _backward(do, q, k, v, o, lse2, doc_start, doc_end, scale, causal)


@_attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse2, doc_start, doc_end, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, ds, de, scale, causal = inputs
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2, ds, de)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse2)


def _fwd_backward(ctx, do, _dlse2):
    q, k, v, o, lse2, ds, de = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse2, ds, de, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, T, D); got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, Hq, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on B, T and D")
    if min(B, Hq, Hkv, T, D) == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a nonzero multiple of kv heads ({Hkv}), sizes nonzero")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be at most 256; got {D}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32; got {q.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not triton_usable(q, k, v):
        raise ValueError(
            f"mup_attention runs Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1); got {q.device}."
            " Use attention_reference (the torch backend) there."
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float; got {scale}")


def _check_doc_ids(doc_ids, q: torch.Tensor, causal: bool) -> None:
    if not causal:
        raise ValueError("doc_ids needs causal=True: only causal document masking is defined")
    want = (q.shape[0], q.shape[2])
    if not isinstance(doc_ids, torch.Tensor) or tuple(doc_ids.shape) != want:
        got = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__
        raise ValueError(f"doc_ids must be a (B, T) = {want} tensor; got {got}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor; got {doc_ids.dtype}")
    if doc_ids.device != q.device:
        raise ValueError(f"doc_ids must be on q's device {q.device}; got {doc_ids.device}")


def mup_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
                  doc_ids: torch.Tensor | None = None, return_lse: bool = False):  # fmt: skip
    """softmax(scale·QKᵀ)·V. q (B,Hq,T,D), k/v (B,Hkv,T,D) with Hq % Hkv == 0 → o (B,Hq,T,D), q's dtype.

    ``scale`` is a runtime float (α/d_head under μP): changing it never recompiles. With ``return_lse``
    also returns the natural-log log-sum-exp of each row of scale·QKᵀ, (B,Hq,T) float32, not differentiable.
    ``doc_ids`` (B, T) integer, on q's device, causal only: a document is a maximal run of equal consecutive
    ids, and query t attends to keys doc_start(t) ≤ s ≤ t; tiles outside a block's documents are skipped.
    Not differentiable w.r.t. ``doc_ids``; ``doc_ids=None`` runs the plain causal kernels unchanged.
    """
    scale = float(scale)
    _check(q, k, v, scale)
    ds = de = None
    if doc_ids is not None:
        _check_doc_ids(doc_ids, q, bool(causal))
        ds, de = _doc_bounds(doc_ids)
    q, k = _dense(q), _dense(k)
    o, lse2 = _attention_fwd(q, k, _like(v, k), ds, de, scale, bool(causal))
    return (o, lse2 * _LN2) if return_lse else o  # natural log for callers; the kernels keep log2


def skipped_tiles(doc_ids: torch.Tensor, block_m: int, block_n: int) -> tuple[int, int]:
    """(skipped, total) key tiles of the causal lower triangle that the forward skips with these blocks.

    Per row of ``doc_ids`` (heads are not counted: every head skips the same): query block [m0, m1) covers
    key tiles 0 … ⌈m1/block_n⌉ − 1 and skips the ⌊doc_start(m0)/block_n⌋ before its first document. One host
    sync (it returns ints): for benchmarks, not the training step.
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2 or doc_ids.numel() == 0:
        raise ValueError(f"doc_ids must be a nonempty (B, T) tensor; got {getattr(doc_ids, 'shape', None)}")
    if block_m <= 0 or block_n <= 0 or block_m % block_n:
        raise ValueError(f"block_m must be a positive multiple of block_n; got {block_m}, {block_n}")
    B, T = doc_ids.shape
    m0 = torch.arange(0, T, block_m, device=doc_ids.device)
    ends = torch.clamp(m0 + block_m, max=T)
    total = B * int(((ends + block_n - 1) // block_n).sum())
    skipped = int((_doc_bounds(doc_ids)[0][:, m0].long() // block_n).sum())
    return skipped, total


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = True,
                        doc_ids: torch.Tensor | None = None, return_lse: bool = False):  # fmt: skip
    """Plain PyTorch attention with the same contract (materialises the T×T scores and, with ``doc_ids``, a
    dense (B, T, T) document mask; fp32 math or wider)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q (B,Hq,T,D), k/v (B,Hkv,T,D), Hq % Hkv == 0; got {q.shape}, {k.shape}")
    if doc_ids is not None:
        _check_doc_ids(doc_ids, q, causal)
    group = q.shape[1] // k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    k, v = (t.repeat_interleave(group, dim=1).to(ct) for t in (k, v))
    s = (q.to(ct) @ k.transpose(-1, -2)) * scale
    if causal:
        T, S = s.shape[-2:]
        keep = torch.ones(T, S, dtype=torch.bool, device=s.device).tril()
        if doc_ids is not None:  # key s at or after the query's document start
            keep = keep & (torch.arange(S, device=s.device) >= _doc_bounds(doc_ids)[0][..., None])[:, None]
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = (torch.exp(s - lse[..., None]) @ v).to(q.dtype)
    return (o, lse.detach().float()) if return_lse else o
