"""Fused μP readout (logit_scale · h Wᵀ → CE + z-loss) against a float64 reference.

Every check draws fresh random inputs and compares by relative error ‖out − ref‖/‖ref‖. On CPU
the Triton kernel runs under the interpreter (fp32/fp16 only); bf16 is checked on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mupfast.kernels.cross_entropy as ce
from mupfast.kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (dtype, loss tol, grad tol): observed errors on CPU are ~5e-7 (fp32) and ~7e-4 (fp16 grads).
PRECISIONS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 3e-3)]
SHAPES = [(37, 64, 1000), (64, 32, 257), (129, 48, 5000), (1, 16, 33)]  # (N, d, V): V ∤ block
SCALE_Z = [(1.0, 0.0), (0.125, 1e-3), (3.0, 1e-2)]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make(N, d, V, dtype, ignore_frac=0.2, device=DEVICE):
    h = torch.randn(N, d, device=device).to(dtype).requires_grad_()
    W = (torch.randn(V, d, device=device) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    t[torch.rand(N, device=device) < ignore_frac] = -100
    if N > 1 and bool((t == -100).all()):
        t[0] = 0
    return h, W, t


def reference64(h, W, t, grad_scale=1.0, **kw):
    """Loss, stats, dh, dW of the float64 reference on the same (rounded) inputs."""
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    loss, stats = linear_cross_entropy_reference(h64, W64, t, return_stats=True, **kw)
    (loss * grad_scale).backward()
    return loss, stats, h64.grad, W64.grad


def check(h, W, t, loss, stats, tol_loss, tol_grad, grad_scale=1.0, **kw):
    loss64, stats64, dh64, dW64 = reference64(h, W, t, grad_scale, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert h.grad.dtype == h.dtype and W.grad.dtype == W.dtype
    assert rel(loss, loss64) < tol_loss
    assert rel(h.grad, dh64) < tol_grad
    assert rel(W.grad, dW64) < tol_grad
    for key in ("max_abs_logit", "lse_sq_mean"):
        assert stats[key].dtype == torch.float32 and stats[key].dim() == 0
        assert rel(stats[key], stats64[key]) < tol_loss, key


@pytest.mark.parametrize("dtype, tol_loss, tol_grad", PRECISIONS)
@pytest.mark.parametrize("N, d, V", SHAPES)
@pytest.mark.parametrize("scale, z", SCALE_Z)
def test_loss_grads_and_stats_match_float64_reference(N, d, V, dtype, tol_loss, tol_grad, scale, z):
    h, W, t = make(N, d, V, dtype)
    loss, stats = fused_linear_cross_entropy(h, W, t, logit_scale=scale, z_loss=z, return_stats=True)
    loss.backward()
    check(h, W, t, loss, stats, tol_loss, tol_grad, logit_scale=scale, z_loss=z)


@pytest.mark.parametrize("dtype, tol_loss, tol_grad", PRECISIONS)
@pytest.mark.parametrize("N, d, V", [(37, 64, 1000), (37, 32, 257)])
def test_chunk_and_vocab_block_tails(N, d, V, dtype, tol_loss, tol_grad):
    """Several chunks (16, 16, 5 rows) and several vocab blocks of 128 with a partial last one."""
    h, W, t = make(N, d, V, dtype)
    loss, stats = ce._fused(h, W, t, 0.5, 1e-3, -100, True, chunk_size=16, block_v=128)
    loss.backward()
    check(h, W, t, loss, stats, tol_loss, tol_grad, logit_scale=0.5, z_loss=1e-3)


def test_bf16_chunk_driver_with_torch_row_op_matches_float64_reference():
    """bf16 through the chunk driver on CPU (the interpreter is wrong for bf16, so the torch row op)."""
    h, W, t = make(300, 64, 3000, torch.bfloat16)
    loss, stats = ce._fused(h, W, t, 3.0, 1e-2, -100, True, chunk_size=64, use_triton=False)
    loss.backward()
    check(h, W, t, loss, stats, 5e-3, 2e-2, logit_scale=3.0, z_loss=1e-2)


@pytest.mark.parametrize("use_triton", [True, False])
def test_what_the_logits_buffer_held_before_never_reaches_the_result(monkeypatch, use_triton):
    """The chunk buffer (row stride padded past V) comes from torch.empty: filled with NaN here, none of
    it may show. CPU bf16 GEMMs read the padding columns of x in x @ W, so it has to be zeroed."""
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        out = real_empty(*size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    dtype, tol_loss, tol_grad = (torch.float32, 1e-5, 1e-5) if use_triton else (torch.bfloat16, 5e-3, 2e-2)
    h, W, t = make(130, 64, 1000, dtype)  # V = 1000: the buffer's rows are 1024 wide
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        loss, stats = ce._fused(h, W, t, 3.0, 1e-2, -100, True, chunk_size=64, use_triton=use_triton)
        loss.backward()
    check(h, W, t, loss, stats, tol_loss, tol_grad, logit_scale=3.0, z_loss=1e-2)


@pytest.mark.parametrize("use_triton", [True, False])
def test_grad_output_other_than_one_scales_the_grads(use_triton):
    h, W, t = make(45, 32, 700, torch.float32)
    loss, stats = ce._fused(h, W, t, 2.0, 1e-3, -100, True, chunk_size=16, use_triton=use_triton)
    (loss * 2.5).backward()
    check(h, W, t, loss, stats, 1e-5, 1e-5, grad_scale=2.5, logit_scale=2.0, z_loss=1e-3)


def test_torch_row_op_matches_triton_kernel():
    """The fallback row op (where Triton cannot run) has the kernel's contract."""
    h, W, t = make(50, 32, 600, torch.float32)
    out = {}
    for use_triton in (True, False):
        hh, WW = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
        loss, stats = ce._fused(hh, WW, t, 3.0, 1e-2, -100, True, chunk_size=16, use_triton=use_triton)
        loss.backward()
        out[use_triton] = (loss, stats["max_abs_logit"], stats["lse_sq_mean"], hh.grad, WW.grad)
    for a, b in zip(out[True], out[False]):
        assert rel(a, b) < 1e-5


def test_logits_rows_are_padded_to_64_and_the_padding_changes_nothing(monkeypatch):
    """The chunk buffer's row stride is V rounded up to 64 elements, so rows start aligned and the row
    kernel's loads vectorise on a GPU (tests/test_kernel_targets.py). On a padded buffer the kernel gives
    bitwise what it gives on a dense one, over whole vocabulary blocks (unmasked) and the ragged tail
    (masked) alike, and never touches the padding."""
    assert [ce.padded_vocab(v) for v in (1, 64, 65, 50257)] == [64, 64, 128, 50304]
    strides = []
    real = ce._rows_triton
    monkeypatch.setattr(
        ce, "_rows_triton", lambda x, *a, **k: (strides.append(x.stride(0)), real(x, *a, **k))
    )
    h, W, t = make(40, 16, 1000, torch.float32)
    ce._fused(h, W, t, 1.0, 0.0, -100, False, chunk_size=16)
    assert strides == [1024] * 3

    n, V = 37, 1000  # block_v = 128: 7 whole blocks and a tail of 104
    x, t = torch.randn(n, V) * 3, torch.randint(0, V, (n,))
    t[::5] = -100
    outs = []
    for stride in (V, ce.padded_vocab(V)):
        full = torch.full((n, stride), float("nan"))
        buf = full[:, :V]
        buf.copy_(x)
        stats = [torch.empty(n) for _ in range(3)]
        real(buf, t, *stats, 0.5, 1e-3, -100, True, block_v=128)
        assert torch.isnan(full[:, V:]).all()  # the padding is neither read (NaN would spread) nor written
        outs.append([buf.clone(), *stats])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert not any(o.isnan().any() for o in outs[1])


@pytest.mark.parametrize("use_triton", [True, False])
def test_all_targets_ignored_gives_zero_loss_and_zero_grads(use_triton):
    h, W, _ = make(20, 16, 300, torch.float32)
    t = torch.full((20,), -100, device=DEVICE)
    loss, stats = ce._fused(h, W, t, 1.0, 1e-2, -100, True, use_triton=use_triton)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(W.grad) == 0
    assert stats["max_abs_logit"].item() == 0.0 and stats["lse_sq_mean"].item() == 0.0
    ref, ref_stats = linear_cross_entropy_reference(h, W, t, return_stats=True)
    assert ref.item() == 0.0 and ref_stats["lse_sq_mean"].item() == 0.0


def test_custom_ignore_index_and_int32_targets():
    h, W, t = make(40, 16, 300, torch.float32, ignore_frac=0.0)
    t[::3] = 7  # class 7 is "ignored"
    loss = fused_linear_cross_entropy(h, W, t.int(), ignore_index=7)
    ref = linear_cross_entropy_reference(h.double(), W.double(), t, ignore_index=7)
    assert rel(loss, ref) < 1e-5


def test_only_inputs_that_require_grad_get_grads():
    h, W, t = make(30, 16, 300, torch.float32)
    with torch.no_grad():
        ref = fused_linear_cross_entropy(h, W, t, z_loss=1e-3)
    W_frozen = W.detach()
    loss = fused_linear_cross_entropy(h, W_frozen, t, z_loss=1e-3)
    loss.backward()
    assert h.grad is not None and W_frozen.grad is None
    assert rel(loss, ref) < 1e-6
    loss64, _, dh64, _ = reference64(h, W, t, z_loss=1e-3)
    assert rel(h.grad, dh64) < 1e-5


def test_tied_embedding_grads_accumulate_from_both_uses():
    V, d, N = 300, 16, 40
    W = (torch.randn(V, d, device=DEVICE) / 4).requires_grad_()
    tokens, t = torch.randint(0, V, (N,), device=DEVICE), torch.randint(0, V, (N,), device=DEVICE)
    W64 = W.detach().double().requires_grad_()
    for weight, fn in ((W, fused_linear_cross_entropy), (W64, linear_cross_entropy_reference)):
        h = torch.tanh(F.embedding(tokens, weight) * 3.0)
        fn(h, weight, t, logit_scale=0.5).backward()
    assert rel(W.grad, W64.grad) < 1e-5


@pytest.mark.parametrize("chunk_elements", [1 << 24, 1000])
def test_reference_equals_plain_cross_entropy_chunked_or_not(monkeypatch, chunk_elements):
    """The oracle itself: F.cross_entropy on scaled logits + z·mean(lse²), float64, with grads."""
    monkeypatch.setattr(ce, "_REFERENCE_CHUNK_ELEMENTS", chunk_elements)  # 1000 → 3 rows a chunk
    h, W, t = make(23, 8, 333, torch.float64)
    loss = linear_cross_entropy_reference(h, W, t, logit_scale=1.7, z_loss=1e-2)
    dh, dW = torch.autograd.grad(loss, (h, W))
    logits = 1.7 * h @ W.T
    valid = t != -100
    plain = F.cross_entropy(logits, t) + 1e-2 * torch.logsumexp(logits, 1)[valid].square().mean()
    pdh, pdW = torch.autograd.grad(plain, (h, W))
    assert rel(loss, plain) < 1e-12 and rel(dh, pdh) < 1e-12 and rel(dW, pdW) < 1e-12


@pytest.mark.parametrize("use_triton", [True, False])
def test_no_host_sync(monkeypatch, use_triton):
    """No .item()/bool()/int()/float()/tolist() on tensors in the whole forward + backward."""
    h, W, t = make(33, 16, 300, torch.float32)

    def forbidden(*_a, **_k):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss, stats = ce._fused(h, W, t, 1.0, 1e-3, -100, True, chunk_size=16, use_triton=use_triton)
    loss.backward()
    monkeypatch.undo()
    assert h.grad is not None and W.grad is not None


def _bad(
    h_shape=(4, 8), W_shape=(10, 8), t_shape=(4,), dtype=torch.float32, W_dtype=None, t_dtype=torch.long
):
    h, W = torch.randn(h_shape, dtype=dtype), torch.randn(W_shape, dtype=W_dtype or dtype)
    return h, W, torch.zeros(t_shape, dtype=t_dtype)


@pytest.mark.parametrize(
    "args, kw",
    [
        (_bad(W_shape=(10, 9)), {}),  # hidden sizes differ
        (_bad(t_shape=(5,)), {}),  # one target per row
        (_bad(h_shape=(4, 8, 1)), {}),  # h not 2-D
        (_bad(h_shape=(0, 8), t_shape=(0,)), {}),  # empty batch
        (_bad(dtype=torch.float64), {}),  # the fused path has no fp64
        (_bad(W_dtype=torch.float16), {}),  # mixed dtypes
        (_bad(t_dtype=torch.float32), {}),  # float targets
        (_bad(), {"z_loss": -1.0}),
        (_bad(), {"logit_scale": float("nan")}),
    ],
)
def test_invalid_inputs_raise_value_error(args, kw):
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(*args, **kw)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from mupfast.kernels.cross_entropy import _fused
    torch.set_num_threads(2)
    mode, N, V, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def inputs(n):
        h = torch.randn(n, d, requires_grad=True)
        return h, (torch.randn(V, d) / d**0.5).requires_grad_(), torch.randint(0, V, (n,))

    def step(h, W, t):
        if mode == "fused":
            loss = _fused(h, W, t, 0.5, 1e-4, -100, False)
        else:  # the unfused path: N x V logits
            logits = F.linear(h, W) * 0.5
            loss = F.cross_entropy(logits, t) + 1e-4 * torch.logsumexp(logits, -1).square().mean()
        loss.backward()

    step(*inputs(64))  # imports and set-up outside the measurement
    args = inputs(N)
    base = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    t0 = time.time()
    step(*args)
    print(json.dumps({"peak_extra_mib": (vm("VmHWM") - base) / 2**20, "seconds": time.time() - t0}))
    """
)


def _peak_extra_mib(mode: str, N: int, V: int, d: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(N), str(V), str(d)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_is_far_below_the_logits():
    """Peak resident memory of one forward+backward, above the inputs, in a fresh process.

    Measured as VmHWM − VmRSS after resetting the high-water mark (``/proc/self/clear_refs``);
    torch's CPU allocator returns large blocks to the OS, so this sees every tensor and every
    interpreter array. It runs the real chunk driver (default chunking) and the Triton row kernel
    under the interpreter: N×V×4 = 256 MiB of fp32 logits, and the fused path must stay below 1/8
    of that (it needs about one 128×V chunk plus an fp32 dW). The unfused path, measured the same
    way, must exceed the bound, so the measurement can fail. It says nothing about GPU memory.
    """
    N, V, d = 4096, 16384, 32
    bound = N * V * 4 / 2**20 / 8
    assert _peak_extra_mib("eager", N, V, d) > bound
    assert _peak_extra_mib("fused", N, V, d) < bound


# ---- GPU only: bf16 (the interpreter is wrong for bf16), syncs, recompiles ----


@gpu
@needs_cuda
@pytest.mark.parametrize("N, d, V", [(1024, 256, 32000), (37, 64, 1000), (4096, 512, 50257)])
@pytest.mark.parametrize("scale, z", SCALE_Z)
def test_bf16_matches_float64_reference(N, d, V, scale, z):
    h, W, t = make(N, d, V, torch.bfloat16)
    loss, stats = fused_linear_cross_entropy(h, W, t, logit_scale=scale, z_loss=z, return_stats=True)
    loss.backward()
    check(h, W, t, loss, stats, 5e-3, 2e-2, logit_scale=scale, z_loss=z)


@gpu
@needs_cuda
def test_gpu_fp32_matches_float64_reference():
    """fp32 at GPT-2's vocabulary (the GPU smoke set's fp32 case): IEEE fp32 GEMMs, so the CPU's
    tolerances hold; a TF32 GEMM would err by ~1e-3."""
    _, tol_loss, tol_grad = PRECISIONS[0]
    h, W, t = make(4096, 512, 50257, torch.float32)
    loss, stats = fused_linear_cross_entropy(h, W, t, logit_scale=0.125, z_loss=1e-3, return_stats=True)
    loss.backward()
    check(h, W, t, loss, stats, tol_loss, tol_grad, logit_scale=0.125, z_loss=1e-3)


@gpu
@needs_cuda
def test_cuda_no_sync_and_no_recompile_for_new_scales():
    h, W, t = make(512, 128, 5000, torch.bfloat16)
    fused_linear_cross_entropy(h, W, t, logit_scale=1.0).backward()  # compile once
    compiled = sum(len(c[0]) for c in ce._ce_rows_kernel.device_caches.values())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scale, z in ((0.3, 1e-4), (2.0, 0.0), (0.7, 1e-2)):
            loss, _ = fused_linear_cross_entropy(h, W, t, logit_scale=scale, z_loss=z, return_stats=True)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sum(len(c[0]) for c in ce._ce_rows_kernel.device_caches.values()) == compiled
