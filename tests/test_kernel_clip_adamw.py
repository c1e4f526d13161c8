"""Per-group clipping fused into AdamW: the Triton kernels against float64 sums and torch's own
``clip_grad_norm_`` + ``torch.optim.AdamW``. On CPU the kernels run under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

import mupfast.kernels.clip_adamw as ca
from mupfast.kernels.clip_adamw import (
    clip_adamw_reference,
    clip_adamw_step,
    clip_coefficients,
    clip_coefficients_reference,
    group_sq_norms,
    group_sq_norms_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Sizes not multiples of any block (1, 7, 1000, 70000), a block-sized one and one just past it.
# Group 2 holds a single tensor, group 3 none at all.
SIZES = [(1000,), (7,), (70000,), (1,), (64, 64), (4097,), (33, 3)]
GROUPS = [0, 1, 2, 0, 1, 0, 4]
NUM_GROUPS = 5
LRS = [1e-2, 3e-3, 1e-3, 5e-2, 2e-2]
WDS = [0.1, 0.0, 0.05, 0.0, 0.3]
BETAS, EPS = (0.9, 0.95), 1e-8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def randn_list(scales=None, dtype=torch.float32) -> list[torch.Tensor]:
    scales = scales or [1.0] * NUM_GROUPS
    return [(torch.randn(s, device=DEVICE) * scales[g]).to(dtype) for s, g in zip(SIZES, GROUPS)]


def fp32_vec(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32, device=DEVICE)


def hparams(coef, step=1, **overrides) -> dict:
    """Keyword arguments of clip_adamw_step: per-group LRS / WDS, BETAS, EPS."""
    kw = dict(coef=coef, lrs=fp32_vec(LRS), weight_decays=fp32_vec(WDS), beta1=BETAS[0], beta2=BETAS[1])
    return {**kw, "eps": EPS, "step": step, **overrides}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_sq_norms_match_float64_sums(dtype):
    grads = randn_list(dtype=dtype)
    ref = torch.zeros(NUM_GROUPS, dtype=torch.float64, device=DEVICE)
    for g, gid in zip(grads, GROUPS):
        ref[gid] += g.double().square().sum()
    out = group_sq_norms(grads, GROUPS, NUM_GROUPS)
    assert out.dtype == torch.float32 and out.shape == (NUM_GROUPS,) and out.device.type == DEVICE
    assert out[3].item() == 0.0
    assert rel(out, ref) < 1e-6
    assert rel(group_sq_norms_reference(grads, GROUPS, NUM_GROUPS), ref) < 1e-6


def test_group_sq_norms_mixed_dtypes_none_and_empty_tensors():
    grads = randn_list()
    grads[1] = grads[1].half()  # a second dtype: a second launch writing into the same partials
    grads[5] = None  # skipped
    grads[6] = torch.empty(0, device=DEVICE)
    ref = group_sq_norms_reference(grads, GROUPS, NUM_GROUPS)
    assert rel(group_sq_norms(grads, GROUPS, NUM_GROUPS), ref) < 1e-6
    empty = group_sq_norms([], [], 3)
    assert torch.equal(empty, torch.zeros(3))


def test_group_sq_norms_are_bitwise_deterministic_and_cache_follows_new_tensors():
    grads = randn_list()
    first = group_sq_norms(grads, GROUPS, NUM_GROUPS)
    assert torch.equal(first, group_sq_norms(grads, GROUPS, NUM_GROUPS))
    other = randn_list(scales=[3.0] * NUM_GROUPS)  # same sizes, new addresses: a new table
    assert (
        rel(group_sq_norms(other, GROUPS, NUM_GROUPS), group_sq_norms_reference(other, GROUPS, NUM_GROUPS))
        < 1e-6
    )


def test_clip_coefficients_per_group_then_global():
    sq = fp32_vec([4.0, 0.25, 100.0, 9.0])
    max_norms = fp32_vec([1.0, 1.0, 0.0, 6.0])  # clipped, under the limit, no clip, under the limit
    coef = clip_coefficients(sq, max_norms)
    expected = [1 / (2 + 1e-6), 1.0, 1.0, 1.0]
    assert torch.allclose(coef.cpu(), torch.tensor(expected), rtol=1e-6, atol=0)
    coef_g = clip_coefficients(sq, max_norms, global_max_norm=2.0)
    total = (coef.double() ** 2 * sq.double()).sum().sqrt()
    assert torch.allclose(coef_g.double(), coef.double() * 2.0 / (total + 1e-6), rtol=1e-6, atol=0)
    assert rel(coef_g, clip_coefficients_reference(sq, max_norms, 2.0)) < 1e-6
    # A non-finite norm poisons the coefficients as torch's clamp does, instead of hiding as 1.
    nan = clip_coefficients(fp32_vec([float("nan"), 1.0]), fp32_vec([1.0, 1.0]), global_max_norm=1.0)
    assert nan.isnan().all()


def make_state(seed: int):
    torch.manual_seed(seed)
    params = [p * 0.02 for p in randn_list()]  # init scale: updates are not lost in the params' rounding
    return params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]


def ours_steps(params, exp_avgs, exp_avg_sqs, grads_per_step, max_norms, global_max=0.0):
    for step, grads in enumerate(grads_per_step, start=1):
        sq = group_sq_norms(grads, GROUPS, NUM_GROUPS)
        coef = clip_coefficients(sq, fp32_vec(max_norms), global_max)
        clip_adamw_step(params, grads, exp_avgs, exp_avg_sqs, GROUPS, **hparams(coef, step))


def torch_steps(params, grads_per_step, max_norms, global_max=0.0):
    """The oracle from torch's own pieces: per-group clip_grad_norm_, then AdamW(foreach=False)."""
    groups = [[p for p, g in zip(params, GROUPS) if g == k] for k in range(NUM_GROUPS)]
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": LRS[k], "weight_decay": WDS[k]} for k, ps in enumerate(groups) if ps],
        betas=BETAS,
        eps=EPS,
        foreach=False,
    )
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for k, ps in enumerate(groups):
            if ps and max_norms[k] > 0:
                torch.nn.utils.clip_grad_norm_(ps, max_norms[k], foreach=False)
        if global_max > 0:
            torch.nn.utils.clip_grad_norm_(params, global_max, foreach=False)
        opt.step()
    return opt


# Group norms are about 71, 64, 265, -, 10: some groups are clipped, some not.
@pytest.mark.parametrize(
    "max_norms,global_max",
    [([5.0, 100.0, 20.0, 1.0, 1e3], 0.0), ([5.0, 100.0, 20.0, 1.0, 1e3], 8.0), ([0.0] * NUM_GROUPS, 0.0)],
    ids=["per-group", "per-group+global", "no-clip"],
)
def test_step_matches_torch_clip_grad_norm_then_adamw(max_norms, global_max):
    params, exp_avgs, exp_avg_sqs = make_state(0)
    before = [p.clone() for p in params]
    torch_params = [p.clone() for p in params]
    grads_per_step = [randn_list() for _ in range(3)]
    ours_steps(params, exp_avgs, exp_avg_sqs, grads_per_step, max_norms, global_max)
    opt = torch_steps(torch_params, grads_per_step, max_norms, global_max)
    for p, m, v, tp, p0 in zip(params, exp_avgs, exp_avg_sqs, torch_params, before):
        assert rel(p, tp) < 1e-6 and rel(p - p0, tp - p0) < 2e-6  # the update itself to ~1e-6
        assert rel(m, opt.state[tp]["exp_avg"]) < 1e-6
        assert rel(v, opt.state[tp]["exp_avg_sq"]) < 1e-6


def test_spiking_group_is_clipped_while_other_groups_update_exactly_as_unclipped():
    """One component's grads ×1e4: only it is clipped; the others are bitwise an unclipped AdamW
    step (which itself matches torch's AdamW, test above)."""
    params, exp_avgs, exp_avg_sqs = make_state(1)
    clipped = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    grads_per_step = [randn_list(scales=[1.0, 1e4, 1.0, 1.0, 1.0]) for _ in range(2)]
    max_norms = [1e3, 1e3, 1e3, 1e3, 1e3]  # only group 1 (norm ~ 6e5) is over its limit
    ours_steps(*clipped, grads_per_step, max_norms)
    ours_steps(params, exp_avgs, exp_avg_sqs, grads_per_step, [0.0] * NUM_GROUPS)  # unclipped AdamW
    for (p, m), (cp, cm), g in zip(zip(params, exp_avgs), zip(clipped[0], clipped[1]), GROUPS):
        if g == 1:
            assert rel(cm, m) > 0.5  # the spike was scaled down
        else:
            assert torch.equal(cp, p) and torch.equal(cm, m)
    # The spiking group's clipped gradient norm is its limit; every other coefficient is exactly 1.
    sq = group_sq_norms(grads_per_step[0], GROUPS, NUM_GROUPS)
    coef = clip_coefficients(sq, fp32_vec(max_norms))
    assert abs((coef[1] * sq[1].sqrt()).item() - 1e3) < 1e-2
    assert torch.equal(coef[[0, 2, 3, 4]], torch.ones(4, device=DEVICE))


def test_step_is_bitwise_deterministic():
    grads_per_step = [randn_list() for _ in range(2)]
    runs = []
    for _ in range(2):
        state = make_state(2)
        ours_steps(*state, grads_per_step, [5.0, 100.0, 20.0, 1.0, 1e3], 8.0)
        runs.append(state)
    for a, b in zip(runs[0], runs[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tensor_step_half_params_and_torch_fallback_agree_with_reference(monkeypatch):
    params, exp_avgs, exp_avg_sqs = make_state(3)
    params = [p.half() for p in params]  # fp16 params with fp32 moments
    ref = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    grads = [g.half() for g in randn_list()]
    coef = fp32_vec([0.5, 1.0, 0.25, 1.0, 1.0])
    step_t = torch.tensor(4, device=DEVICE)  # a device step (CUDA-graph friendly) vs a Python int
    clip_adamw_step(params, grads, exp_avgs, exp_avg_sqs, GROUPS, **hparams(coef, step_t))
    clip_adamw_reference(ref[0], grads, ref[1], ref[2], GROUPS, **hparams(coef, 4))
    for a, b in zip(params + exp_avgs + exp_avg_sqs, ref[0] + ref[1] + ref[2]):
        assert rel(a, b) < (1e-3 if a.dtype == torch.float16 else 1e-6)
    monkeypatch.setattr(ca, "triton_usable", lambda *t: False)  # the torch backend
    state = make_state(3)
    fallback = [[t.clone() for t in ts] for ts in state]
    ours_steps(*state, [grads], [5.0, 1.0, 1.0, 1.0, 1.0])
    monkeypatch.undo()
    ours_steps(*fallback, [grads], [5.0, 1.0, 1.0, 1.0, 1.0])
    for a, b in zip(state[0], fallback[0]):
        assert rel(a, b) < 1e-6


def test_step_skips_none_and_empty_grads():
    params, exp_avgs, exp_avg_sqs = make_state(4)
    before = [p.clone() for p in params]
    grads = randn_list()
    grads[2] = None
    params[6], exp_avgs[6], exp_avg_sqs[6] = (torch.empty(0, 5, device=DEVICE) for _ in range(3))
    grads[6] = torch.empty(0, 5, device=DEVICE)
    clip_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, GROUPS, **hparams(torch.ones(NUM_GROUPS, device=DEVICE))
    )
    assert torch.equal(params[2], before[2]) and not torch.equal(params[0], before[0])
    one = torch.ones(1)
    clip_adamw_step([], [], [], [], [], **hparams(one, lrs=one, weight_decays=one))


def test_invalid_inputs_raise_clear_errors():
    params, exp_avgs, exp_avg_sqs = make_state(5)
    grads = randn_list()
    kw = hparams(torch.ones(NUM_GROUPS, device=DEVICE))
    with pytest.raises(ValueError, match="entries but group_ids"):
        clip_adamw_step(params[:-1], grads, exp_avgs, exp_avg_sqs, GROUPS, **kw)
    with pytest.raises(ValueError, match="out of range"):
        group_sq_norms(grads, [0, 1, 2, 0, 1, 0, NUM_GROUPS], NUM_GROUPS)
    with pytest.raises(ValueError, match="one device"):
        group_sq_norms([grads[0], torch.ones(3, device="meta")], [0, 0], 1)
    with pytest.raises(ValueError, match="shape"):
        clip_adamw_step(
            params, grads, exp_avgs, exp_avg_sqs[:-1] + [torch.zeros(5, device=DEVICE)], GROUPS, **kw
        )
    with pytest.raises(ValueError, match="lrs"):
        clip_adamw_step(params, grads, exp_avgs, exp_avg_sqs, GROUPS, **{**kw, "lrs": torch.ones(2)})
    with pytest.raises(ValueError, match="step counts from 1"):
        clip_adamw_step(params, grads, exp_avgs, exp_avg_sqs, GROUPS, **{**kw, "step": 0})
    with pytest.raises(ValueError, match="max_norms"):
        clip_coefficients(torch.ones(3), torch.ones(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_gpu_large_step_matches_reference(pdtype):
    """bf16 params (fp32 moments) and a large tensor list; the interpreter cannot check bf16."""
    torch.manual_seed(6)
    shapes = [(50304, 768), (768,), (2304, 768), (3072, 768), (768, 3072), (1, 1), (12345,)] * 3
    groups = [i % 4 for i in range(len(shapes))]
    params = [torch.randn(s, device="cuda").to(pdtype) for s in shapes]
    grads = [torch.randn(s, device="cuda").to(pdtype) for s in shapes]
    ms, vs = (
        [torch.randn_like(p, dtype=torch.float32) for p in params],
        [torch.rand_like(p, dtype=torch.float32) for p in params],
    )
    ref = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    sq = group_sq_norms(grads, groups, 4)
    assert rel(sq, group_sq_norms_reference(grads, groups, 4)) < 1e-5
    kw = dict(
        coef=clip_coefficients(sq, torch.full((4,), 100.0, device="cuda")),
        lrs=torch.full((4,), 1e-3, device="cuda"),
        weight_decays=torch.full((4,), 0.1, device="cuda"),
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        step=7,
    )
    clip_adamw_step(params, grads, ms, vs, groups, **kw)
    clip_adamw_reference(ref[0], grads, ref[1], ref[2], groups, **kw)
    tol = 5e-3 if pdtype == torch.bfloat16 else 1e-6
    for a, b in zip(params + ms + vs, ref[0] + ref[1] + ref[2]):
        assert rel(a, b) < tol


@pytest.mark.parametrize("update", [clip_adamw_step, clip_adamw_reference])
def test_a_device_skip_flag_writes_nothing_and_a_clear_one_is_a_plain_step(update):
    """The trainer's non-finite skip, decided on the device: skip=1 leaves p, m, v bitwise as they
    were; skip=0 gives exactly the update without a flag."""
    state = make_state(5)
    grads = randn_list()
    coef = fp32_vec([0.5, 1.0, 0.25, 1.0, 1.0])
    before = [[t.clone() for t in ts] for ts in state]
    update(*state[:1], grads, *state[1:], GROUPS, **hparams(coef, 3, skip=torch.ones(1, device=DEVICE)))
    for a, b in zip(sum(state, []), sum(before, [])):
        assert torch.equal(a, b)
    update(*state[:1], grads, *state[1:], GROUPS, **hparams(coef, 3, skip=torch.zeros((), device=DEVICE)))
    update(*before[:1], grads, *before[1:], GROUPS, **hparams(coef, 3))
    for a, b in zip(sum(state, []), sum(before, [])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one-element"):
        update(*state[:1], grads, *state[1:], GROUPS, **hparams(coef, 3, skip=torch.zeros(2, device=DEVICE)))
