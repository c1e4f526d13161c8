"""Ours against what users would otherwise use, one group per op and shape (see conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.suite.conftest import DEVICE, GPU
from mupfast.kernels import attention as attention
from mupfast.kernels import clip_adamw as clip_adamw
from mupfast.kernels import cross_entropy as cross_entropy

DTYPE = torch.bfloat16 if GPU else torch.float32
SYNC = torch.cuda.synchronize if GPU else (lambda: None)

# (B, H, T, D): GPU shapes keep B·T = 16k tokens at hidden 2048; CPU shapes stay small.
ATTN_SHAPES = [(8, 16, 2048, 128), (2, 16, 8192, 128)] if GPU else [(2, 4, 256, 64)]
# (N, d, V)
CE_SHAPES = [(16384, 2048, 32768), (16384, 4096, 131072)] if GPU else [(1024, 128, 4096)]
# tensor shapes of an optimizer problem: a GPT with 12 layers of width d
OPT_WIDTHS = [768, 2048] if GPU else [128]


def _bench(benchmark, fn, **info):
    benchmark.extra_info.update(info)

    def run():
        fn()
        SYNC()

    benchmark.pedantic(run, warmup_rounds=2, rounds=10 if GPU else 3, iterations=1)


# ------------------------------------------------------------------------------------ attention


def _attention_methods():
    if GPU:
        methods = {"mupfast": lambda q, k, v, scale: attention.mup_attention(q, k, v, scale=scale)}
    else:
        methods = {"mupfast": lambda q, k, v, scale: attention.attention_reference(q, k, v, scale=scale)}
    methods["sdpa"] = lambda q, k, v, scale: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale
    )
    try:
        from flash_attn import flash_attn_func

        methods["flash_attn"] = lambda q, k, v, scale: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale
        )
    except ImportError:
        pass
    return methods


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", list(_attention_methods()))
def test_attention_fwd_bwd(benchmark, ceiling, shape, method):
    B, H, T, D = shape
    benchmark.group = f"attention fwd+bwd causal B{B} H{H} T{T} D{D}"
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    fn = _attention_methods()[method]

    def step():
        fn(q, k, v, 1.0 / D).sum().backward()

    _bench(benchmark, step, flops=3.5 * 4 * B * H * T * T * D / 2)


# ------------------------------------------------------------------------------------ readout


@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["mupfast", "eager"])
def test_readout_fwd_bwd(benchmark, ceiling, shape, method):
    N, d, V = shape
    benchmark.group = f"readout fwd+bwd N{N} d{d} V{V}"
    h = torch.randn(N, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    W = (torch.randn(V, d, device=DEVICE, dtype=DTYPE) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE)
    if method == "mupfast":
        fn = cross_entropy.fused_linear_cross_entropy if GPU else cross_entropy.linear_cross_entropy_reference

        def step():
            fn(h, W, t, logit_scale=0.5).backward()
    else:

        def step():
            F.cross_entropy(0.5 * (h @ W.t()).float(), t).backward()

    _bench(benchmark, step, flops=3 * 2 * N * d * V)


# ------------------------------------------------------------------------------------ clip + AdamW


def _gpt_tensors(d: int) -> list[tuple[int, tuple[int, ...]]]:
    out = [(0, (32768, d))]
    for _ in range(12):
        out += [
            (1, (d, d)),
            (2, (d, d)),
            (3, (d, d)),
            (4, (d, d)),
            (5, (4 * d, d)),
            (6, (d, 4 * d)),
            (7, (d,)),
        ]
    return out


@pytest.mark.parametrize("width", OPT_WIDTHS)
@pytest.mark.parametrize("method", ["mupfast", "torch AdamW + clip_grad_norm_"])
def test_clip_adamw_step(benchmark, ceiling, width, method):
    shapes = _gpt_tensors(width)
    G = 8
    benchmark.group = f"clip+AdamW step, 12-layer GPT d{width}"
    params = [torch.randn(s, device=DEVICE) * 0.02 for _, s in shapes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    ids = [g for g, _ in shapes]
    n = sum(p.numel() for p in params)
    if method == "mupfast":
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        f32 = dict(device=DEVICE, dtype=torch.float32)
        lrs, wds, maxn = (
            torch.full((G,), 1e-3, **f32),
            torch.full((G,), 0.1, **f32),
            torch.full((G,), 1e6, **f32),
        )
        norms = clip_adamw.group_sq_norms if GPU else clip_adamw.group_sq_norms_reference
        update = clip_adamw.clip_adamw_step if GPU else clip_adamw.clip_adamw_reference

        def step():
            coef = clip_adamw.clip_coefficients(norms(grads, ids, G), maxn)
            update(
                params,
                grads,
                m,
                v,
                ids,
                coef=coef,
                lrs=lrs,
                weight_decays=wds,
                beta1=0.9,
                beta2=0.95,
                eps=1e-8,
                step=1,
            )
    else:
        ps = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g
        groups = [{"params": [p for p, i in zip(ps, ids) if i == gi]} for gi in range(G)]
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=GPU, foreach=not GPU)

        def step():
            for g in groups:
                torch.nn.utils.clip_grad_norm_(g["params"], 1e6, foreach=True)
            opt.step()

    _bench(benchmark, step, bytes=32 * n)
