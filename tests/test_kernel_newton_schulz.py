"""The symmetric-matmul Newton–Schulz kernel against float64 references, and the backend switch
that reaches it from Muon (mupfast.optim.muon, mupfast.optim.muon_sharded, ClipAdamW)."""

from __future__ import annotations

import random

import pytest
import torch

import mupfast.optim.muon as muon
from mupfast.distributed.zero_shards import GroupShards, contiguous_fragments
from mupfast.errors import ConfigError
from mupfast.kernels import newton_schulz as ns_kernel
from mupfast.kernels.newton_schulz import newton_schulz_triton, syrk
from mupfast.model import build_model
from mupfast.optim import build_optimizer
from mupfast.optim.muon_sharded import muon_sphere_update_sharded
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# As tests/test_muon.py: 5 quintic steps send every normalised singular value ≥ 2e-3 into this band.
BAND = (0.68, 1.21)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _sym(b: int, m: int, gen: torch.Generator) -> torch.Tensor:
    s = torch.randn(b, m, m, generator=gen)
    return s + s.mT


# Non-square, not multiples of the interpreter's 32-wide tiles: several tiles, masked edges, a batch.
@pytest.mark.parametrize("shape", [(1, 40, 72), (2, 70, 33)])
def test_syrk_equals_a_float64_gram_matrix_on_both_triangles(shape):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    p = torch.randn(*shape, generator=gen)
    out = syrk(p)
    ref = p.double() @ p.double().mT
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6
    assert _rel(out.tril(), ref.tril()) < 1e-6 and _rel(out.triu(), ref.triu()) < 1e-6  # mirrors written


def test_syrk_fuses_the_newton_schulz_epilogue_alpha_a_a_plus_beta_d():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    a = _sym(2, 45, gen)  # the second NS matmul: P = A (symmetric), D = A
    a_, b_, c_ = ns_kernel.NS_COEFFS
    out = syrk(a, alpha=c_, beta=b_, d=a)
    ref = c_ * (a.double() @ a.double()) + b_ * a.double()
    assert _rel(out, ref) < 1e-6
    d = _sym(2, 45, gen)  # a D other than P
    assert _rel(syrk(a, alpha=-0.5, beta=2.0, d=d), -0.5 * (a.double() @ a.double()) + 2 * d.double()) < 1e-6


def test_syrk_in_fp16_stores_fp16_from_an_fp32_accumulator():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    p = (torch.randn(1, 50, 66, generator=gen) / 8).half()
    out = syrk(p)
    ref = p.double() @ p.double().mT
    assert out.dtype == torch.float16 and _rel(out, ref) < 1e-3


@pytest.mark.parametrize("shape", [(40, 72), (72, 40), (2, 24, 56)])
def test_triton_newton_schulz_equals_the_float64_torch_path(shape):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    g = torch.randn(*shape, generator=gen) * 3.0
    out = newton_schulz_triton(g)
    ref = muon.newton_schulz(g.double(), dtype=torch.float64, backend="torch")
    assert out.shape == g.shape and out.dtype == g.dtype
    assert _rel(out, ref) < 1e-5


def test_triton_newton_schulz_sends_singular_values_into_the_band():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    m, n = 48, 80
    s = torch.logspace(0, -2.3, m, dtype=torch.float64)  # a 200× spread of singular values
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    g = (u @ torch.diag(s) @ v.T).float().T  # tall: iterated transposed
    sv = torch.linalg.svdvals(newton_schulz_triton(g).double())
    assert BAND[0] <= sv.min() and sv.max() <= BAND[1], (sv.min().item(), sv.max().item())


def test_triton_newton_schulz_keeps_fp16_inputs_fp16():
    g = torch.randn(20, 36, generator=torch.Generator().manual_seed(random.randrange(2**31))).half()
    out = muon.newton_schulz(g, backend="triton")
    assert out.dtype == torch.float16 and out.shape == g.shape
    assert _rel(out, muon.newton_schulz(g.double(), dtype=torch.float64)) < 1e-2


def test_backend_switch_auto_is_torch_and_unknown_names_are_refused(monkeypatch):
    assert muon.AUTO_NS_BACKEND == "torch"  # until a GPU measurement says otherwise
    called = []
    monkeypatch.setattr(muon, "newton_schulz_triton", lambda *a: called.append(1))
    muon.newton_schulz(torch.randn(8, 12))
    assert not called
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        muon.newton_schulz(torch.randn(8, 12), backend="cuda")


def test_triton_backend_where_triton_cannot_run_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(ns_kernel, "triton_usable", lambda *t: False)  # CPU without the interpreter
    with pytest.raises(RuntimeError) as err:
        muon.newton_schulz(torch.randn(8, 12), backend="triton")
    msg = str(err.value)
    assert "\n" not in msg and "TRITON_INTERPRET=1" in msg and "'torch'" in msg


def test_the_config_field_reaches_every_muon_update(monkeypatch):
    with pytest.raises(ConfigError, match="optim.newton_schulz_backend"):
        tiny_config("optim.newton_schulz_backend=cuda")
    calls = []

    def spy(g, steps=5, dtype=None):
        calls.append(tuple(g.shape))
        return ns_kernel.newton_schulz_reference(g, steps, dtype)

    monkeypatch.setattr(muon, "newton_schulz_triton", spy)
    for backend, expect_calls in (("auto", False), ("triton", True)):
        calls.clear()
        cfg = tiny_config("model.parametrization=hyperp", f"optim.newton_schulz_backend={backend}")
        model = build_model(cfg.model)
        opt = build_optimizer(model, cfg)
        assert opt.newton_schulz_backend == backend
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        n_muon = sum(len(g["params"]) for g in opt.param_groups if g["optimizer"] == "muon_sphere")
        assert n_muon > 0 and len(calls) == (n_muon if expect_calls else 0)


def test_muon_on_a_partition_with_the_triton_backend_equals_whole_matrix_torch_muon():
    shapes = [torch.Size((7, 5)), torch.Size((4, 9))]
    numels = [s.numel() for s in shapes]
    offsets, partition = [0, numels[0] + 2], numels[0] + 2 + numels[1]
    shards = GroupShards(shapes, partition, contiguous_fragments(offsets, numels, partition, 1), rank=0)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    mats = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    flat, gflat = torch.zeros(partition), torch.zeros(partition)
    for off, m, g in zip(offsets, mats, grads):
        flat[off : off + m.numel()] = m.reshape(-1)
        gflat[off : off + g.numel()] = g.reshape(-1)
    muon_sphere_update_sharded(flat, gflat, {}, shards, lr=0.05, ns_backend="triton")
    for off, m, g in zip(offsets, mats, grads):
        muon.muon_sphere_update(m, g, {}, lr=0.05, ns_backend="torch")
        torch.testing.assert_close(flat[off : off + m.numel()].view(m.shape), m, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- bf16: GPU only
# The interpreter is silently wrong for bf16, so these run where CUDA is.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 768, 3072), (2, 1000, 1000)])
def test_gpu_bf16_syrk_matches_cublas_error(shape):
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    p = torch.randn(*shape, generator=gen, device="cuda").bfloat16()
    ref = p.double() @ p.double().mT
    ours, peer = _rel(syrk(p), ref), _rel(p @ p.mT, ref)
    assert ours <= 2 * peer + 1e-6, (ours, peer)
    a = syrk(p) / shape[2]
    ref = ns_kernel.NS_COEFFS[2] * (a.double() @ a.double()) + ns_kernel.NS_COEFFS[1] * a.double()
    assert _rel(syrk(a, alpha=ns_kernel.NS_COEFFS[2], beta=ns_kernel.NS_COEFFS[1], d=a), ref) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (1024, 1024), (3, 300, 520)])
def test_gpu_bf16_newton_schulz_is_as_close_to_float64_as_the_torch_bf16_path(shape):
    gen = torch.Generator(device="cuda").manual_seed(random.randrange(2**31))
    g = torch.randn(*shape, generator=gen, device="cuda")
    ref = muon.newton_schulz(g.double(), dtype=torch.float64)
    ours = newton_schulz_triton(g)  # bf16 iteration by default on CUDA, fp32 result
    peer = muon.newton_schulz(g, backend="torch")
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    assert _rel(ours, ref) <= 1.5 * _rel(peer, ref) + 1e-3, (_rel(ours, ref), _rel(peer, ref))
    sv = torch.linalg.svdvals(ours.double())
    assert 0.6 <= sv.min() and sv.max() <= 1.25  # the band, widened for bf16 rounding


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp32_newton_schulz_follows_torchs_tf32_setting():
    g = torch.randn(512, 1536, device="cuda")
    ref = muon.newton_schulz(g.double(), dtype=torch.float64)
    assert _rel(newton_schulz_triton(g, dtype=torch.float32), ref) < 1e-5  # default "highest": IEEE fp32
