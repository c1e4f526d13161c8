"""Per-group gradient-norm clipping fused into AdamW, as multi-tensor Triton kernels.

One optimizer step is three small device-side stages, none of which syncs with the host:

1. ``group_sq_norms``: one launch reads every grad once; each (tensor, block) program writes an fp32
   partial sum of squares into its own slot (blocks are laid out group by group), then one program
   per group adds its contiguous run of partials in a fixed order. No float atomics: bitwise
   deterministic (the apex ``multi_tensor_l2norm`` pattern).
2. ``clip_coefficients``: coef_g = min(1, max_norm_g / (‖g‖_g + 1e-6)), optionally times a global
   clip of the clipped total, on device. The caller may all-reduce the squared norms before it.
3. ``clip_adamw_step``: one launch reads p, g, m, v once and writes p, m, v once, applying g·coef_g,
   decoupled weight decay and bias-corrected Adam with each tensor's group lr and weight decay.

Tensors reach the kernels through a device table of int64 ``data_ptr``s plus a block→(tensor,
block index) table, cached by the tensors' addresses and sizes. Full blocks load unmasked (so the
compiler can vectorise); only each tensor's tail block is masked. Math is fp32 whatever the storage
dtype (params fp32/bf16/fp16; m, v usually fp32); FMA fusion is set explicitly on every launch
(``runtime.LAUNCH``). The ``*_reference`` functions are the same math
in plain PyTorch: the oracle for tests and the backend wherever Triton cannot run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from mupfast.kernels.runtime import LAUNCH, triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a Linux-only dependency
    triton = None

__all__ = [
    "group_sq_norms",
    "group_sq_norms_reference",
    "clip_coefficients",
    "clip_coefficients_reference",
    "clip_adamw_step",
    "clip_adamw_reference",
]

NORM_BLOCK = 4096  # elements per program in the sum-of-squares pass
STEP_BLOCK = 2048  # elements per program in the AdamW pass (8 warps: 8 fp32 per thread per tensor)
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
_CACHE_SIZE = 32

if triton is not None:
    _TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    @triton.jit
    def _tensor_ptr(table, idx, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        ptr = tl.load(table + idx).to(tl.pointer_type(DTYPE))
        if ALIGNED:  # every address in the table is 16-byte aligned: allow 128-bit accesses
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _sq_partials_kernel(ptrs, numels, blk_tensor, blk_index, blk_slot, partials,
                            G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        n = tl.load(numels + t)
        g_ptr = _tensor_ptr(ptrs, t, G_DTYPE, ALIGNED)
        start = tl.load(blk_index + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            g = tl.load(g_ptr + offs).to(tl.float32)
        else:
            g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(partials + tl.load(blk_slot + pid), tl.sum(g * g, axis=0))

    @triton.jit
    def _group_sum_kernel(partials, seg, out, RBLOCK: tl.constexpr):
        grp = tl.program_id(0)
        lo = tl.load(seg + grp)
        hi = tl.load(seg + grp + 1)
        acc = tl.zeros([RBLOCK], dtype=tl.float32)
        for s in range(lo, hi, RBLOCK):
            offs = s + tl.arange(0, RBLOCK)
            acc += tl.load(partials + offs, mask=offs < hi, other=0.0)
        tl.store(out + grp, tl.sum(acc, axis=0))

    @triton.jit
    def _coef_kernel(
        sq_ptr, max_ptr, out_ptr, G, global_max, USE_GLOBAL: tl.constexpr, BLOCK_G: tl.constexpr
    ):
        offs = tl.arange(0, BLOCK_G)
        mask = offs < G
        sq = tl.load(sq_ptr + offs, mask=mask, other=0.0)
        mx = tl.load(max_ptr + offs, mask=mask, other=0.0)
        # NaN-propagating minimum, as torch's clamp: a non-finite norm poisons the update
        coef = tl.minimum(mx / (tl.sqrt_rn(sq) + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
        coef = tl.where(mx > 0, coef, 1.0)
        if USE_GLOBAL:
            total = tl.sqrt_rn(tl.sum(tl.where(mask, coef * coef * sq, 0.0), axis=0))
            coef = coef * tl.minimum(global_max / (total + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + offs, coef, mask=mask)

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, coef, decay, step_size, bc2_sqrt,
                     beta1c, beta2, beta2c, eps, MASKED: tl.constexpr):  # fmt: skip
        if MASKED:
            mask = offs < n
        else:
            mask = None
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * coef
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        m = m + beta1c * (g - m)  # torch's exp_avg.lerp_(grad, 1 - beta1)
        v = v * beta2 + beta2c * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p.to(tl.float32) * decay - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _clip_adamw_kernel(ptrs, n_tensors, numels, groups, blk_tensor, blk_index,
                           coef_ptr, lr_ptr, wd_ptr, bc_ptr, skip_ptr, bc1, bc2_sqrt, beta1c, beta2, beta2c,
                           eps, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                           V_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BC_ON_DEVICE: tl.constexpr,
                           SKIP_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        run = True
        if SKIP_ON_DEVICE:  # the update was cancelled on the device (a non-finite loss): write nothing
            run = tl.load(skip_ptr) == 0
        if run:
            _clip_adamw_program(ptrs, n_tensors, numels, groups, blk_tensor, blk_index, coef_ptr, lr_ptr,
                                wd_ptr, bc_ptr, bc1, bc2_sqrt, beta1c, beta2, beta2c, eps, P_DTYPE, G_DTYPE,
                                M_DTYPE, V_DTYPE, ALIGNED, BC_ON_DEVICE, BLOCK)  # fmt: skip

    @triton.jit
    def _clip_adamw_program(ptrs, n_tensors, numels, groups, blk_tensor, blk_index,
                            coef_ptr, lr_ptr, wd_ptr, bc_ptr, bc1, bc2_sqrt, beta1c, beta2, beta2c, eps,
                            P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                            V_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BC_ON_DEVICE: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        n = tl.load(numels + t)
        grp = tl.load(groups + t)
        p_ptr = _tensor_ptr(ptrs, t, P_DTYPE, ALIGNED)
        g_ptr = _tensor_ptr(ptrs, n_tensors + t, G_DTYPE, ALIGNED)
        m_ptr = _tensor_ptr(ptrs, 2 * n_tensors + t, M_DTYPE, ALIGNED)
        v_ptr = _tensor_ptr(ptrs, 3 * n_tensors + t, V_DTYPE, ALIGNED)
        if BC_ON_DEVICE:  # step given as a device tensor: bias corrections computed there
            bc1 = tl.load(bc_ptr)
            bc2_sqrt = tl.load(bc_ptr + 1)
        coef = tl.load(coef_ptr + grp)
        lr = tl.load(lr_ptr + grp)
        decay = 1.0 - lr * tl.load(wd_ptr + grp)
        step_size = lr / bc1
        start = tl.load(blk_index + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        args = (coef, decay, step_size, bc2_sqrt, beta1c, beta2, beta2c, eps)
        if start + BLOCK <= n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, *args, MASKED=False)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, *args, MASKED=True)


# ----------------------------------------------------------------------------------- validation


def _active(lists: dict[str, Sequence], group_ids: Sequence[int], num_groups: int) -> list[int]:
    """Indices whose grad is present and non-empty, after checking lengths, groups and devices."""
    n = len(group_ids)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries but group_ids has {n}")
    bad = [g for g in group_ids if not 0 <= int(g) < num_groups]
    if bad:
        raise ValueError(f"group id {bad[0]} out of range for {num_groups} groups")
    grads = lists["grads"]
    keep = [i for i in range(n) if grads[i] is not None]
    devices = {lst[i].device for lst in lists.values() for i in keep}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for i in keep:
        shape = grads[i].shape
        for name, lst in lists.items():
            if lst[i].shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(lst[i].shape)}, grads[{i}] {tuple(shape)}")
    return [i for i in keep if grads[i].numel() > 0]


def _group_vec(name: str, t: torch.Tensor, num_groups: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != (num_groups,):
        raise ValueError(f"{name} must be a tensor of shape ({num_groups},)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tensors are on {device}")
    return t.to(torch.float32).contiguous()


def host_to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host vector on ``device`` without a host sync: a blocking copy to CUDA synchronises the
    stream, so the values go through pinned memory and are queued behind the submitted work."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ------------------------------------------------------------------------ multi-tensor tables

_plans: OrderedDict[tuple, list] = OrderedDict()


def _plan(kind: str, lists: list[list[torch.Tensor]], groups: list[int], extra: tuple, build) -> list:
    """Launch plan cached by the tensors' addresses, sizes and dtypes (LRU of ``_CACHE_SIZE``)."""
    key = (kind, extra, tuple(groups), tuple(t.data_ptr() for lst in lists for t in lst),
           tuple(t.numel() for t in lists[0]), tuple(t.dtype for lst in lists for t in lst))  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = build()
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    _plans.move_to_end(key)
    return plan


def _tables(lists: list[list[torch.Tensor]], groups: list[int], block: int, device) -> dict:
    """Device tables for one launch: addresses (operand-major), sizes, groups, block→(tensor, index)."""
    addrs = [t.data_ptr() for lst in lists for t in lst]
    # Sizes as Python ints: the tables are rebuilt whenever gradients move, which under DeepSpeed
    # stage 0 is every step, so nothing here reads a tensor back.
    sizes = [t.numel() for t in lists[0]]
    total_blocks = sum(-(-n // block) for n in sizes)
    numels = torch.tensor(sizes, dtype=torch.int64)
    n_blocks = (numels + block - 1) // block
    blk_tensor = torch.repeat_interleave(torch.arange(len(numels)), n_blocks, output_size=total_blocks)
    first = torch.cumsum(n_blocks, 0) - n_blocks
    blk_index = torch.arange(total_blocks) - first[blk_tensor]
    return {
        "ptrs": host_to_device(addrs, torch.int64, device),
        "numels": host_to_device(numels, torch.int64, device),
        "groups": host_to_device(groups, torch.int32, device),
        "blk_tensor": host_to_device(blk_tensor, torch.int32, device),
        "blk_index": host_to_device(blk_index, torch.int32, device),
        "n_blocks": total_blocks,
        "n_tensors": len(numels),
        "aligned": all(a % 16 == 0 for a in addrs),
        "_blk_tensor_cpu": blk_tensor,
        "_first_block": first,
    }


def _by_dtype(lists: list[list[torch.Tensor]]) -> dict[tuple, list[int]]:
    """Positions grouped by the dtypes of their operands: one launch per dtype combination."""
    out: dict[tuple, list[int]] = {}
    for j in range(len(lists[0])):
        out.setdefault(tuple(lst[j].dtype for lst in lists), []).append(j)
    for sig in out:
        if any(d not in _TL for d in sig):
            raise ValueError(f"unsupported dtypes {sig}; use float32, float16 or bfloat16")
    return out


# ------------------------------------------------------------------------- per-group sq norms


def group_sq_norms_reference(grads, group_ids, num_groups, *, device=None) -> torch.Tensor:
    """Per-group Σ g² in fp32 with plain PyTorch (the torch backend of ``group_sq_norms``)."""
    idx = _active({"grads": grads}, group_ids, num_groups)
    device = grads[idx[0]].device if idx else torch.device(device or "cpu")
    out = torch.zeros(num_groups, dtype=torch.float32, device=device)
    for i in idx:
        out[group_ids[i]] += grads[i].float().square().sum()
    return out


def _norm_plan(gs: list[torch.Tensor], groups: list[int], num_groups: int, device) -> dict:
    """Blocks laid out group by group, so each group's partials form one contiguous segment."""
    order = sorted(range(len(gs)), key=lambda j: groups[j])
    gs, groups = [gs[j] for j in order], [groups[j] for j in order]
    per_tensor = [-(-g.numel() // NORM_BLOCK) for g in gs]
    counts = torch.tensor(per_tensor, dtype=torch.int64)
    first_slot = torch.cumsum(counts, 0) - counts
    seg = torch.zeros(num_groups + 1, dtype=torch.int64).index_add_(0, torch.tensor(groups) + 1, counts)
    launches = []
    for (dtype,), sub in _by_dtype([gs]).items():
        tab = _tables([[gs[j] for j in sub]], [groups[j] for j in sub], NORM_BLOCK, device)
        shift = first_slot[sub] - tab["_first_block"]  # a tensor's blocks -> its consecutive slots
        slot = torch.arange(tab["n_blocks"]) + shift[tab["_blk_tensor_cpu"]]
        launches.append((_TL[dtype], tab, host_to_device(slot, torch.int32, device)))
    seg = host_to_device(seg.cumsum(0), torch.int64, device)
    return {"seg": seg, "n_partials": sum(per_tensor), "launches": launches}


def group_sq_norms(grads, group_ids, num_groups, *, device=None) -> torch.Tensor:
    """Per-group sum of squares of ``grads`` (None entries skipped) as a ``(num_groups,)`` fp32 tensor.

    One multi-tensor pass with per-block partials and a fixed-order reduction: deterministic and
    free of host syncs. ``device`` places the zeros when no grad is given.
    """
    idx = _active({"grads": grads}, group_ids, num_groups)
    gs = [grads[i] if grads[i].is_contiguous() else grads[i].contiguous() for i in idx]
    if not gs or not triton_usable(*gs):
        return group_sq_norms_reference(grads, group_ids, num_groups, device=device)
    dev = gs[0].device
    groups = [int(group_ids[i]) for i in idx]
    plan = _plan("norm", [gs], groups, (num_groups, dev), lambda: _norm_plan(gs, groups, num_groups, dev))
    partials = torch.empty(plan["n_partials"], dtype=torch.float32, device=dev)
    for dtype, tab, slot in plan["launches"]:
        _sq_partials_kernel[(tab["n_blocks"],)](
            tab["ptrs"], tab["numels"], tab["blk_tensor"], tab["blk_index"], slot, partials,
            G_DTYPE=dtype, ALIGNED=tab["aligned"], BLOCK=NORM_BLOCK, num_warps=8, **LAUNCH,
        )  # fmt: skip
    out = torch.empty(num_groups, dtype=torch.float32, device=dev)
    if num_groups:
        _group_sum_kernel[(num_groups,)](partials, plan["seg"], out, RBLOCK=1024, **LAUNCH)
    return out


# -------------------------------------------------------------------------- clip coefficients


def clip_coefficients_reference(sq, max_norms, global_max_norm: float = 0.0) -> torch.Tensor:
    norm = sq.float().sqrt()
    coef = torch.where(max_norms > 0, (max_norms / (norm + CLIP_EPS)).clamp(max=1.0), 1.0)
    if global_max_norm > 0:
        total = (coef * coef * sq).sum().sqrt()
        coef = coef * (global_max_norm / (total + CLIP_EPS)).clamp(max=1.0)
    return coef


def clip_coefficients(
    sq: torch.Tensor, max_norms: torch.Tensor, global_max_norm: float = 0.0
) -> torch.Tensor:
    """coef_g = min(1, max_norm_g / (√sq_g + 1e-6)) where max_norm_g > 0, else 1; then, if
    ``global_max_norm`` > 0, × min(1, global_max_norm / (‖clipped total‖ + 1e-6)). On device."""
    if sq.dim() != 1:
        raise ValueError(f"sq must be 1-D (one squared norm per group), got shape {tuple(sq.shape)}")
    max_norms = _group_vec("max_norms", max_norms, sq.numel(), sq.device)
    sq = sq.to(torch.float32).contiguous()
    if not triton_usable(sq) or sq.numel() == 0:
        return clip_coefficients_reference(sq, max_norms, global_max_norm)
    out = torch.empty_like(sq)
    _coef_kernel[(1,)](sq, max_norms, out, sq.numel(), float(global_max_norm), USE_GLOBAL=global_max_norm > 0,
                       BLOCK_G=max(16, triton.next_power_of_2(sq.numel())), **LAUNCH)  # fmt: skip
    return out


# --------------------------------------------------------------------------------- AdamW step


def _bias_corrections(step, beta1: float, beta2: float, device: torch.device):
    """(1 − β1^t, √(1 − β2^t)) as Python floats, or as a device fp32 pair when ``step`` is a tensor."""
    if isinstance(step, torch.Tensor):
        s = step.to(device=device, dtype=torch.float64)
        return torch.stack([1 - beta1**s, (1 - beta2**s).sqrt()]).to(torch.float32).reshape(2)
    if step < 1:
        raise ValueError(f"step counts from 1 (after incrementing), got {step}")
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def clip_adamw_reference(params, grads, exp_avgs, exp_avg_sqs, group_ids, *, coef, lrs, weight_decays,
                         beta1, beta2, eps, step, skip=None) -> None:  # fmt: skip
    """The same update as ``clip_adamw_step`` in plain PyTorch, tensor by tensor (fp32 math)."""
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    idx = _active(lists, group_ids, len(coef))
    if not idx:
        return
    dev = params[idx[0]].device
    coef, lrs, wds = (_group_vec(n, t, len(coef), dev) for n, t in
                      (("coef", coef), ("lrs", lrs), ("weight_decays", weight_decays)))  # fmt: skip
    bc = _bias_corrections(step, beta1, beta2, dev)
    keep = None if skip is None else _skip_flag(skip, dev).bool()
    for i in idx:
        grp = group_ids[i]
        p, m, v = params[i].float(), exp_avgs[i].float(), exp_avg_sqs[i].float()  # views when fp32
        if keep is not None:  # the result is chosen on the device: work on copies
            p, m, v = p.clone(), m.clone(), v.clone()
        g = grads[i].float() * coef[grp]
        p.mul_(1 - lrs[grp] * wds[grp])
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc[1]).add_(eps)
        p.sub_(m / denom * (lrs[grp] / bc[0]))
        for dst, src in ((params[i], p), (exp_avgs[i], m), (exp_avg_sqs[i], v)):
            if keep is not None:
                dst.copy_(torch.where(keep, dst, src.to(dst.dtype)))
            elif src is not dst:
                dst.copy_(src)


def _skip_flag(skip: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise ValueError("skip must be a one-element tensor (nonzero: leave every tensor unchanged)")
    if skip.device != device:
        raise ValueError(f"skip is on {skip.device} but the tensors are on {device}")
    return skip.reshape(()).to(torch.int32)


def clip_adamw_step(params, grads, exp_avgs, exp_avg_sqs, group_ids, *, coef, lrs, weight_decays,
                    beta1, beta2, eps, step, skip=None) -> None:  # fmt: skip
    """In place, for tensor i of group g: g' = grad·coef_g, then torch.optim.AdamW's update with
    lr_g and weight_decay_g (decoupled decay, bias correction at ``step`` ≥ 1). One read and one
    write of p, m, v in a single multi-tensor launch per dtype combination; no host sync.

    ``skip``: a one-element device tensor; where it is nonzero the launch writes nothing (the
    trainer's non-finite-loss skip, decided on the device)."""
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    idx = _active(lists, group_ids, len(coef))
    kw = dict(coef=coef, lrs=lrs, weight_decays=weight_decays, beta1=beta1, beta2=beta2, eps=eps, step=step,
              skip=skip)  # fmt: skip
    if not idx or not triton_usable(*(lst[i] for lst in lists.values() for i in idx)):
        return clip_adamw_reference(params, grads, exp_avgs, exp_avg_sqs, group_ids, **kw)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for i in idx:
            if not lists[name][i].is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous (it is updated in place)")
    dev = params[idx[0]].device
    G = len(coef)
    coef, lrs, wds = (_group_vec(n, t, G, dev) for n, t in
                      (("coef", coef), ("lrs", lrs), ("weight_decays", weight_decays)))  # fmt: skip
    bc = _bias_corrections(step, beta1, beta2, dev)
    on_dev = isinstance(bc, torch.Tensor)
    bc1, bc2_sqrt = (1.0, 1.0) if on_dev else bc
    skip_flag = _skip_flag(skip, dev) if skip is not None else coef  # coef: an unread placeholder
    ts = [[lst[i] for i in idx] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
    ts[1] = [g if g.is_contiguous() else g.contiguous() for g in ts[1]]
    groups = [int(group_ids[i]) for i in idx]

    def build():
        return [(tuple(_TL[d] for d in sig), _tables([[lst[j] for j in sub] for lst in ts],
                 [groups[j] for j in sub], STEP_BLOCK, dev)) for sig, sub in _by_dtype(ts).items()]  # fmt: skip

    for (p_t, g_t, m_t, v_t), tab in _plan("step", ts, groups, (dev,), build):
        _clip_adamw_kernel[(tab["n_blocks"],)](
            tab["ptrs"], tab["n_tensors"], tab["numels"], tab["groups"], tab["blk_tensor"], tab["blk_index"],
            coef, lrs, wds, bc if on_dev else coef, skip_flag, bc1, bc2_sqrt, 1 - beta1, beta2, 1 - beta2, eps,
            P_DTYPE=p_t, G_DTYPE=g_t, M_DTYPE=m_t, V_DTYPE=v_t, ALIGNED=tab["aligned"],
            BC_ON_DEVICE=on_dev, SKIP_ON_DEVICE=skip is not None, BLOCK=STEP_BLOCK, num_warps=8, **LAUNCH,
        )  # fmt: skip
