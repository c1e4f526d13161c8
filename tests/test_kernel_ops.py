"""The kernels as PyTorch operators (torch.ops.mupfast.*): registration checks, values and gradients through
the operator path against float64 references, and tracing by torch._dynamo / AOTAutograd without graph breaks.

On CPU the kernels run under the Triton interpreter, where the operators are opaque ``custom_op``s (the
interpreter cannot take fake tensors); dynamo and AOTAutograd trace them with their fake implementations and
run the real kernels. Where Triton compiles, attention is a ``triton_op`` that inductor sees into; the GPU tests
at the end compile both operators with inductor and compare with eager, values and gradients, in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from mupfast.kernels.attention import _doc_bounds, attention_reference, mup_attention
from mupfast.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
from mupfast.kernels.runtime import triton_usable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_usable(torch.empty(0, device=DEVICE)), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ATTN_FWD = torch.ops.mupfast.attention_fwd.default
ATTN_BWD = torch.ops.mupfast.attention_bwd.default
CE = torch.ops.mupfast.fused_linear_cross_entropy.default


def _gen(*key) -> torch.Generator:
    """A fresh generator per case (seeded by its parameters, so failures reproduce)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _qkv(B, Hq, Hkv, T, D, dtype=torch.float32, device=DEVICE, key=""):
    g = _gen(B, Hq, Hkv, T, D, dtype, key)
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, T, D, generator=g) for _ in range(2))
    do = torch.randn(B, Hq, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def _docs(B, T, key="") -> torch.Tensor:
    """Packed rows: random document boundaries (about one per 12 tokens)."""
    starts = torch.rand(B, T, generator=_gen(B, T, key)) < 1 / 12
    return starts.long().cumsum(1).to(DEVICE)


def _ce_inputs(N, d, V, dtype=torch.float32, device=DEVICE, key=""):
    g = _gen(N, d, V, dtype, key)
    h = torch.randn(N, d, generator=g).to(device=device, dtype=dtype)
    W = (torch.randn(V, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.2] = -100
    return h, W, t.to(device)


def _attention_grads(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, return_lse=True, **kw)
    o.backward(do)
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _ce_grads(fn, h, W, t, **kw):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    loss, stats = fn(h, W, t, return_stats=True, **kw)
    loss.backward()
    return loss.detach(), stats["max_abs_logit"], stats["lse_sq_mean"], h.grad, W.grad


# ------------------------------------------------------------------------ registration (opcheck)
@pytest.mark.parametrize("doc", [False, True], ids=["causal", "docs"])
def test_opcheck_attention(doc):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, on a GQA case with a
    ragged tail in the (B, T, H, D) layout the model passes."""
    q, k, v, do = _qkv(1, 4, 2, 37, 16, key="opcheck")
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ds, de = _doc_bounds(_docs(1, 37)) if doc else (None, None)
    torch.library.opcheck(ATTN_FWD, (q, k, v, ds, de, 0.25, True))
    o, lse2 = ATTN_FWD(q, k, v, ds, de, 0.25, True)
    args = (do, *(t.detach() for t in (q, k, v, o, lse2)), ds, de, 0.25, True)
    torch.library.opcheck(ATTN_BWD, args)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch-rows"])
def test_opcheck_cross_entropy(use_triton):
    h, W, t = _ce_inputs(19, 16, 300, key="opcheck")
    h.requires_grad_(), W.requires_grad_()
    torch.library.opcheck(CE, (h, W, t, 0.5, 1e-3, -100, True, True, 8, None, use_triton))
    # without gradients the unneeded ones come back empty, in the fake implementation too
    torch.library.opcheck(
        CE, (h.detach(), W.detach(), t, 0.5, 0.0, -100, False, False, None, None, use_triton)
    )


def test_fake_implementations_give_the_real_shapes_dtypes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, _ = _qkv(2, 4, 1, 9, 8, dtype=torch.float16, key="fake")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) underneath
    h, W, t = _ce_inputs(7, 8, 50, dtype=torch.float16, key="fake")
    real = [
        *ATTN_FWD(q, k, v, None, None, 0.1, True),
        *CE(h, W, t, 1.0, 0.0, -100, True, False, None, None, True),
    ]
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = [
            *ATTN_FWD(q, k, v, None, None, 0.1, True),
            *CE(h, W, t, 1.0, 0.0, -100, True, False, None, None, True),
        ]
    meta = lambda x: (tuple(x.shape), x.dtype, x.stride(), x.device)
    assert [meta(x) for x in fake] == [meta(x) for x in real]
    assert real[0].stride() == q.stride() and real[4].shape == (0,)  # o keeps q's layout; dW not asked for


# ------------------------------------------------------------------- values through the operators
@pytest.mark.parametrize("doc", [False, True], ids=["causal", "docs"])
def test_attention_op_matches_float64_reference(doc):
    q, k, v, do = _qkv(2, 4, 2, 45, 32, key=f"values{doc}")
    docs = _docs(2, 45, key="values") if doc else None
    ours = _attention_grads(mup_attention, q, k, v, do, scale=1.5 / 32, doc_ids=docs)
    ref = _attention_grads(
        attention_reference, *(t.double() for t in (q, k, v, do)), scale=1.5 / 32, doc_ids=docs
    )
    errors = {n: _rel(a, b) for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref)}
    assert all(e < 1e-5 for e in errors.values()), errors


def test_attention_public_function_dispatches_to_the_operator():
    q, k, v, _ = (t.requires_grad_() for t in _qkv(1, 2, 2, 5, 8, key="dispatch"))
    o, lse = mup_attention(q, k, v, scale=0.1, return_lse=True)
    assert "mupfast_attention_fwd" in type(o.grad_fn).__name__ and not lse.requires_grad


def test_cross_entropy_op_matches_float64_reference():
    h, W, t = _ce_inputs(37, 24, 333, key="values")
    ours = _ce_grads(fused_linear_cross_entropy, h, W, t, logit_scale=0.7, z_loss=1e-3)
    ref = _ce_grads(linear_cross_entropy_reference, h.double(), W.double(), t, logit_scale=0.7, z_loss=1e-3)
    errors = {n: _rel(a, b) for n, a, b in zip(("loss", "max", "lse2", "dh", "dW"), ours, ref)}
    assert all(e < 1e-5 for e in errors.values()), errors
    assert "mupfast_fused_linear_cross_entropy" in type(fused_linear_cross_entropy(
        h.requires_grad_(), W, t).grad_fn).__name__  # fmt: skip


# ------------------------------------------------------------------------------ tracing, no breaks
def _attention_loss(q, k, v, doc_ids):
    o, lse = mup_attention(q, k, v, scale=0.125, causal=True, doc_ids=doc_ids, return_lse=True)
    return o.float().square().sum() + lse.sum()


def _ce_loss(h, W, t):
    loss, stats = fused_linear_cross_entropy(h, W, t, logit_scale=0.5, return_stats=True)
    return loss + stats["lse_sq_mean"].detach() * 0


def _checkpointed(q, k, v, doc_ids, h, W, t):
    """Both operators inside non-reentrant activation checkpoints, as the model's checkpointed blocks."""
    a = checkpoint(_attention_loss, q, k, v, doc_ids, use_reentrant=False)
    return a + checkpoint(_ce_loss, h, W, t, use_reentrant=False)


def _all_inputs(dtype=torch.float32, key="trace"):
    q, k, v, _ = _qkv(1, 4, 2, 33, 16, dtype=dtype, key=key)
    h, W, t = _ce_inputs(21, 16, 130, dtype=dtype, key=key)
    return (
        [x.requires_grad_() for x in (q, k, v)],
        _docs(1, 33, key=key),
        [h.requires_grad_(), W.requires_grad_(), t],
    )


@pytest.mark.parametrize("fn", ["attention", "cross_entropy", "checkpointed"])
def test_dynamo_traces_the_public_functions_without_graph_breaks(fn):
    torch._dynamo.reset()
    (q, k, v), docs, (h, W, t) = _all_inputs()
    f, args = {
        "attention": (_attention_loss, (q, k, v, docs)),
        "cross_entropy": (_ce_loss, (h, W, t)),
        "checkpointed": (_checkpointed, (q, k, v, docs, h, W, t)),
    }[fn]
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # the checkpointed regions are subgraphs (tag_activation_checkpoint): read every module's code
    code = "\n".join(m.code for g in explained.graphs for m in g.modules() if hasattr(m, "code"))
    for op in {"attention": ["attention_fwd"], "cross_entropy": ["fused_linear_cross_entropy"]}.get(
        fn, ["attention_fwd", "fused_linear_cross_entropy"]
    ):
        assert f"mupfast.{op}" in code  # one node, not traced into


def test_aot_eager_fullgraph_values_and_grads_equal_eager():
    """AOTAutograd traces forward and backward (fake implementations, autograd formulas) in one graph each,
    checkpoints included; the compiled step gives eager's numbers."""
    torch._dynamo.reset()
    (q, k, v), docs, (h, W, t) = _all_inputs(key="aot")
    leaves = (q, k, v, h, W)
    eager = _checkpointed(q, k, v, docs, h, W, t)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(_checkpointed, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, docs, h, W, t)
    grads = torch.autograd.grad(out, leaves)
    assert _rel(out, eager) < 1e-6
    assert all(_rel(a, b) < 1e-6 for a, b in zip(grads, eager_grads))


_HOP_SCRIPT = """
import json, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from mupfast.kernels import attention as A, attention_tuning, runtime as R
assert not R.INTERPRET and type(A._attention_fwd).__name__ == "CustomOpDef"
attention_tuning.device_target = lambda t: R.TARGETS["sm_90a"]  # no GPU to ask: prune for an H100

def step(q, k, v, do, ds, de):
    o, lse2 = A._forward(q, k, v, ds, de, 0.125, True)
    return (o, lse2, *A._backward(do, q, k, v, o, lse2, ds, de, 0.125, True))

with FakeTensorMode():
    q, do = (torch.empty(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.empty(2, 2, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ds = de = torch.empty(2, 256, device="cuda", dtype=torch.int32)
gm = make_fx(step, tracing_mode="fake")(q, k, v, do, ds, de)
nodes = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
print(json.dumps([{"grids": len(n.kwargs["grid"]), "kwargs": sorted(n.kwargs["kwargs"])} for n in nodes]))
"""


def test_triton_op_bodies_trace_to_kernel_nodes_with_fake_cuda_tensors():
    """What inductor sees of the attention triton_ops, without a GPU: in a process without the interpreter, the
    launches trace (make_fx, fake CUDA tensors) into four triton_kernel_wrapper nodes, the autotuned ones with
    one grid per config their pruner keeps for sm_90a, every launch carrying enable_fp_fusion."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _HOP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(nodes) == 4  # forward, δ preprocess, dK/dV, dQ
    assert [n["grids"] > 1 for n in nodes] == [True, False, True, True]
    assert all("enable_fp_fusion" in n["kwargs"] for n in nodes)
    assert "DS" in nodes[0]["kwargs"] and "DE" in nodes[2]["kwargs"]  # the document bounds reach the kernels


# ---------------------------------------------------------------------- GPU: inductor against eager
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("doc", [False, True], ids=["causal", "docs"])
def test_gpu_inductor_attention_equals_eager_bf16(doc):
    torch._dynamo.reset()
    q, k, v, do = _qkv(2, 8, 2, 1000, 128, dtype=torch.bfloat16, key="inductor")
    docs = _docs(2, 1000, key="inductor") if doc else None
    eager = _attention_grads(mup_attention, q, k, v, do, scale=1 / 128, doc_ids=docs)
    compiled = torch.compile(mup_attention, fullgraph=True)  # inductor
    ours = _attention_grads(compiled, q, k, v, do, scale=1 / 128, doc_ids=docs)
    # Same kernels; inductor may pick another autotuned block (another summation order): bf16 rounding.
    errors = {n: _rel(a, b) for n, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, eager)}
    assert all(e < 1e-2 for e in errors.values()), errors


@pytest.mark.gpu
@needs_cuda
def test_gpu_inductor_cross_entropy_equals_eager_bf16():
    torch._dynamo.reset()
    h, W, t = _ce_inputs(2048, 256, 50257, dtype=torch.bfloat16, key="inductor")
    eager = _ce_grads(fused_linear_cross_entropy, h, W, t, logit_scale=0.25, z_loss=1e-4)
    compiled = torch.compile(fused_linear_cross_entropy, fullgraph=True)
    ours = _ce_grads(compiled, h, W, t, logit_scale=0.25, z_loss=1e-4)
    errors = {n: _rel(a, b) for n, a, b in zip(("loss", "max", "lse2", "dh", "dW"), ours, eager)}
    assert all(e < 1e-6 for e in errors.values()), errors  # an opaque operator: the very same computation
