"""Clip + AdamW under ``optim.backend: auto`` on CUDA: two ops, each decided per tensor list (count, elements,
dtypes, groups) by :mod:`mupfast.ops.dispatch`.

* ``grad_norms``, every group's Σg²: our multi-tensor kernel (``group_sq_norms``), torch's ``_foreach_norm``
  summed per group, and the tensor-by-tensor torch loop.
* ``clip_adamw``, the clipped AdamW step: our fused kernel (``clip_adamw_step``), torch's fused AdamW
  (``torch._fused_adamw_``, one call per group: the clip coefficient as its ``grad_scale``, the skip flag as its
  ``found_inf``, the decoupled weight decay a foreach multiply before it) and the tensor-by-tensor torch loop.

Both are elementwise over the tensors, so a candidate is checked and timed on 1-D tensors of the real sizes
and dtypes, at most ``SAMPLE_ELEMENTS`` of them (a model's whole state copied would not fit beside it): the
norms against an fp64 sum, the step's parameter change and moments against the fp32 reference, and a skipped
step must leave every tensor as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mupfast.kernels import clip_adamw as fused
from mupfast.ops import dispatch
from mupfast.ops.dispatch import Dispatcher, Unavailable

log = logging.getLogger(__name__)

NORM_CANDIDATES = ("triton", "torch_foreach", "torch")
STEP_CANDIDATES = ("triton", "torch_fused", "torch")
SAMPLE_ELEMENTS = 1 << 24  # what a check or a timing copies at most, per operand


@dataclass(frozen=True)
class ListKey:
    """A tensor list as the elementwise ops see it."""

    tensors: int
    elements: int
    dtypes: tuple[str, ...]  # the distinct dtype combinations across the operands, in order of appearance
    groups: int

    def label(self) -> str:
        return f"n{self.tensors}-E{self.elements}-{'+'.join(self.dtypes)}-G{self.groups}"


# ------------------------------------------------------------------ torch's peers --------------------------
def group_sq_norms_foreach(grads, group_ids, num_groups, *, device=None) -> torch.Tensor:
    """Per-group Σg² in fp32: one ``_foreach_norm`` over the tensors, squared and added per group."""
    idx = [i for i, g in enumerate(grads) if g is not None and g.numel() > 0]
    device = grads[idx[0]].device if idx else torch.device(device or "cpu")
    out = torch.zeros(num_groups, dtype=torch.float32, device=device)
    if idx:
        norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float32)
        where = fused.host_to_device([group_ids[i] for i in idx], torch.long, device)
        out.index_add_(0, where, torch.stack(norms).square())
    return out


def clip_adamw_torch_fused(params, grads, exp_avgs, exp_avg_sqs, group_ids, *, coef, lrs, weight_decays,
                           beta1, beta2, eps, step, skip=None) -> None:  # fmt: skip
    """``clip_adamw_step`` by torch's fused AdamW, one call per group (same contract)."""
    if not hasattr(torch, "_fused_adamw_"):
        raise Unavailable("this torch has no fused AdamW")
    idx = [i for i, g in enumerate(grads) if g is not None and g.numel() > 0]
    skipped = None if skip is None else skip.reshape(()).to(torch.float32)
    steps = (
        step if isinstance(step, torch.Tensor) else torch.tensor(float(step), device=params[idx[0]].device)
    )
    for grp in dict.fromkeys(group_ids[i] for i in idx):
        mine = [i for i in idx if group_ids[i] == grp]
        ps = [params[i] for i in mine]
        decay = lrs[grp] * weight_decays[grp] * (1.0 if skipped is None else 1.0 - skipped)
        torch._foreach_mul_(ps, 1.0 - decay)  # AdamW's decoupled decay, first, as torch's fused AdamW does it
        torch._fused_adamw_(
            ps, [grads[i] for i in mine], [exp_avgs[i] for i in mine], [exp_avg_sqs[i] for i in mine], [],
            [steps] * len(mine), lr=lrs[grp], beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
            amsgrad=False, maximize=False, grad_scale=1.0 / coef[grp], found_inf=skipped,
        )  # fmt: skip


NORMS = {"triton": fused.group_sq_norms, "torch_foreach": group_sq_norms_foreach,
         "torch": fused.group_sq_norms_reference}  # fmt: skip
STEPS = {"triton": fused.clip_adamw_step, "torch_fused": clip_adamw_torch_fused,
         "torch": fused.clip_adamw_reference}  # fmt: skip


# ------------------------------------------------------------------ the dispatching kernels -----------------
def sq_norms_auto(grads, group_ids, num_groups, *, device=None) -> torch.Tensor:
    """``group_sq_norms`` by the candidate decided for this tensor list."""
    key, layout = _key([grads], group_ids, num_groups)
    if not layout:
        return fused.group_sq_norms_reference(grads, group_ids, num_groups, device=device)
    choice = _decide(_NORMS, key, layout, check_norms, time_norms)
    return NORMS[choice](grads, group_ids, num_groups, device=device)


def clip_adamw_auto(params, grads, exp_avgs, exp_avg_sqs, group_ids, **kw) -> None:
    """``clip_adamw_step`` by the candidate decided for this tensor list."""
    key, layout = _key([params, grads, exp_avgs, exp_avg_sqs], group_ids, len(kw["coef"]))
    if layout:
        choice = _decide(_STEPS, key, layout, check_step, time_step)
        STEPS[choice](params, grads, exp_avgs, exp_avg_sqs, group_ids, **kw)


def _decide(d: Dispatcher, key: ListKey, layout, check, timer) -> str:
    device = layout[0][0].device
    return d.pick((key, device), lambda: key, check, timer, device, layout=layout)


def _key(lists, group_ids, num_groups) -> tuple[ListKey, list]:
    """The key of the positions with a gradient, and their layout: (first operand, dtypes, group id) each."""
    grads = lists[1] if len(lists) > 1 else lists[0]
    layout = [(lists[0][i], tuple(lst[i].dtype for lst in lists), group_ids[i])
              for i, g in enumerate(grads) if g is not None and g.numel() > 0]  # fmt: skip
    dtypes = tuple(dict.fromkeys("/".join(map(dispatch.dtype_name, d)) for _, d, _ in layout))
    return ListKey(len(layout), sum(t.numel() for t, _, _ in layout), dtypes, num_groups), layout


# ------------------------------------------------------------------ checking and timing ---------------------
def _sample(layout, device: torch.device, scales: tuple[float, ...], seed: int = 0):
    """Per operand a list of random 1-D tensors of the layout's sizes and dtypes (the first SAMPLE_ELEMENTS
    elements' worth), each operand drawn as ``scale``·N(0,1) (a negative scale: its absolute value, |·|)."""
    g = dispatch.generator(device, seed)
    sizes, left = [], SAMPLE_ELEMENTS
    for t, dtypes, grp in layout:
        if left <= 0:
            break
        sizes.append((min(t.numel(), left), dtypes, grp))
        left -= sizes[-1][0]
    lists = [[(torch.randn(n, generator=g, device=device) * abs(s)).abs_() if s < 0 else
              torch.randn(n, generator=g, device=device) * s for n, _, _ in sizes] for s in scales]  # fmt: skip
    lists = [[x.to(d[j]) for x, (_, d, _) in zip(lst, sizes)] for j, lst in enumerate(lists)]
    return lists, [grp for _, _, grp in sizes]


def check_norms(name: str, key: ListKey, *, layout, device: torch.device) -> str | None:
    """None when ``name``'s per-group Σg² is within the dtype's tolerance of the fp64 sum."""
    (grads,), groups = _sample(layout, device, (1.0,))
    got = NORMS[name](grads, groups, key.groups, device=device)
    ref = torch.zeros(key.groups, dtype=torch.float64, device=device)
    for x, grp in zip(grads, groups):
        ref[grp] += x.double().square().sum()
    return dispatch.mismatch({"sq_norms": got}, {"sq_norms": ref}, dispatch.tolerance(grads[0].dtype))


def _step_inputs(key: ListKey, layout, device: torch.device, skip: float):
    """A step's tensors (small parameters, so a bf16 one still resolves the change) and hyperparameters."""
    (p, g, m, v), groups = _sample(layout, device, (1e-2, 1.0, 1e-1, -1e-2))
    h = dispatch.generator(device, 1)
    G = key.groups
    kw = dict(coef=0.3 + 0.7 * torch.rand(G, generator=h, device=device), lrs=torch.full((G,), 1e-2, device=device),
              weight_decays=torch.full((G,), 0.1, device=device), beta1=0.9, beta2=0.95, eps=1e-8,
              step=torch.tensor(3.0, device=device), skip=torch.full((1,), skip, device=device).int())  # fmt: skip
    return (p, g, m, v), groups, kw


def check_step(name: str, key: ListKey, *, layout, device: torch.device) -> str | None:
    """None when ``name``'s parameter change and moments are within tolerance of the fp32 reference's, and a
    skipped step changes nothing."""
    (p, g, m, v), groups, kw = _step_inputs(key, layout, device, 0.0)
    p0 = [x.clone() for x in p]
    ref = [[x.float().clone() for x in lst] for lst in (p, m, v)]
    fused.clip_adamw_reference(ref[0], [x.float().clone() for x in g], ref[1], ref[2], groups, **kw)
    STEPS[name](p, g, m, v, groups, **kw)  # after the reference: torch's fused AdamW may rescale g in place

    def flat(xs, minus=None):
        return torch.cat([(x.double() - (0 if minus is None else b.double())).flatten() for x, b in
                          zip(xs, minus or xs)])  # fmt: skip

    got = {"dp": flat(p, p0), "m": flat(m), "v": flat(v)}
    wrong = dispatch.mismatch(got, {"dp": flat(ref[0], p0), "m": flat(ref[1]), "v": flat(ref[2])},
                              dispatch.tolerance(p[0].dtype))  # fmt: skip
    if wrong is not None:
        return wrong
    (p, g, m, v), groups, kw = _step_inputs(key, layout, device, 1.0)
    before = [x.clone() for x in p + m + v]
    STEPS[name](p, g, m, v, groups, **kw)
    wrong = dispatch.mismatch({"skipped": flat(p + m + v)}, {"skipped": flat(before)}, 0.0)
    return None if wrong is None else f"a skipped step changed the tensors ({wrong})"


def time_norms(name: str, key: ListKey, *, layout, device: torch.device) -> float:
    (grads,), groups = _sample(layout, device, (1.0,))
    return dispatch.cuda_ms(lambda: NORMS[name](grads, groups, key.groups, device=device), device)


def time_step(name: str, key: ListKey, *, layout, device: torch.device) -> float:
    (p, g, m, v), groups, kw = _step_inputs(key, layout, device, 0.0)
    kw["lrs"] = kw["lrs"] * 1e-3  # thousands of timed steps must not run the parameters away
    return dispatch.cuda_ms(lambda: STEPS[name](p, g, m, v, groups, **kw), device)


def environment_versions() -> dict[str, str]:
    return {
        **dispatch.base_versions(),
        "mupfast_clip_adamw_kernel": dispatch.source_hash("mupfast.kernels.clip_adamw"),
    }


_NORMS = Dispatcher(
    "grad_norms", NORM_CANDIDATES, fallback="triton", versions_fn=environment_versions, logger=log
)
_STEPS = Dispatcher(
    "clip_adamw", STEP_CANDIDATES, fallback="triton", versions_fn=environment_versions, logger=log
)


def dispatched_kernels() -> tuple:
    """(per-group squared norms, clipped AdamW update), each deciding per tensor list on its first call."""
    return sq_norms_auto, clip_adamw_auto
