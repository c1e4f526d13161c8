"""Newton–Schulz orthogonalisation (Muon's NS5) with a symmetric-matmul Triton kernel.

One quintic step on the wide orientation X (m×n, m ≤ n) is three matmuls:

    A = X·Xᵀ                 (m×m, K = n)   symmetric
    B = b·A + c·A·A          (m×m, K = m)   A·A = A·Aᵀ is symmetric too
    X ← a·X + B·X            (m×n, K = m)   no symmetry in the output

The first two are SYRK-shaped (C = α·P·Pᵀ + β·D with D symmetric): ``_syrk_kernel`` computes only
the lower-triangular output tiles (one program per tile (i, j), i ≥ j, mapped from the program id
in closed form, so the grid does not depend on a host table) and writes each off-diagonal tile
twice, as itself and transposed into its mirror. That halves their flops: per step the torch path
does 4m²n + 2m³ flops, this one m²n + m³ fewer (≈ 1.5× fewer for square matrices, 1.2× for d×4d).
B's epilogue (β·A, the fp32 → storage-dtype cast) is fused into the second launch.

The third matmul is ``torch.baddbmm(X, B, X, beta=a)`` into a preallocated buffer: its output has
no symmetry to exploit, cuBLAS already fuses the a·X term as its beta epilogue, and a Triton GEMM
could at best tie cuBLAS there. Batched inputs (any leading dims) run as one launch per matmul,
the batch on the grid's second axis. Storage is the iteration dtype (bf16 on CUDA by default,
as the torch path), accumulation fp32; fp32 inputs use TF32 dots exactly when torch's own fp32
matmuls would (``torch.get_float32_matmul_precision()``), so both backends compute alike.

``newton_schulz_reference`` is the same function in plain PyTorch (the ``torch`` backend and the
oracle); the optimizer needs no gradient through either, so there is no autograd.Function.
"""

from __future__ import annotations

import contextlib

import torch

from mupfast.kernels.runtime import INTERPRET, LAUNCH, autotune_configs, device_target, triton_usable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a Linux-only dependency
    triton = None

__all__ = ["NS_COEFFS", "NS_STEPS", "newton_schulz_reference", "newton_schulz_triton", "syrk"]

#: Quintic Newton–Schulz coefficients (a, b, c): X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def newton_schulz_reference(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximately orthogonalise a matrix (or a batch of them): U·Vᵀ of its SVD, same shape.

    Plain PyTorch matmuls. ``dtype`` (the iteration dtype) defaults to bf16 on CUDA and fp32
    elsewhere; the result is returned in g's dtype.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: X·Xᵀ is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


if triton is not None:

    def _configs() -> list:
        # The first entry is the interpreter's: 32-wide tiles exercise several tiles and the masks
        # on test matrices of 40-96 rows. 64-wide tiles are there for d = 768-1024, where 128-wide
        # ones leave most SMs idle (21-36 lower-triangular tiles); configs that exceed the device's
        # shared memory (fp32) are pruned.
        configs = [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
        for block, block_k, warps, stages in [
            (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 5), (64, 64, 4, 3),
        ]:  # fmt: skip
            configs.append(
                triton.Config({"BLOCK": block, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
            )
        return autotune_configs(configs)

    def shared_memory(elem: int, block: int, block_k: int, stages: int) -> int:
        """Two block×block_k operand tiles per pipeline stage: exact for sm_90a's tensor-core dots, one stage
        high on sm_80 and for IEEE fp32 (the compiled sizes, tests/test_kernel_targets.py)."""
        return 2 * block * block_k * elem * stages

    def _prune(configs, named_args, target=None, strict=False, **kwargs):
        """Drop the configs whose shared memory exceeds the launch's device (fp32 128-wide tiles on an A100),
        rather than compiling them only to fail at launch; ``target`` and ``strict`` (no fallback) are passed
        by the compile-target tool."""
        target = target or device_target(named_args["P"])
        elem = named_args["P"].element_size()
        smem = lambda c: shared_memory(elem, c.kwargs["BLOCK"], c.kwargs["BLOCK_K"], c.num_stages)  # noqa: E731
        kept = [c for c in configs if smem(c) <= target.smem]
        return kept or ([] if strict else [min(configs, key=smem)])

    @triton.autotune(
        configs=_configs(), key=["M", "K", "HAS_D"], prune_configs_by={"early_config_prune": _prune}
    )
    @triton.jit
    def _syrk_kernel(P, D, C, M, K, alpha, beta,
                     s_pb, s_pm, s_pk, s_db, s_dm, s_dn, s_cb, s_cm, s_cn,
                     HAS_D: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """C = alpha·P·Pᵀ (+ beta·D), one lower-triangular tile (i ≥ j) per program, mirrored."""
        pid = tl.program_id(0)
        # Tiles are numbered row by row in the lower triangle: row i starts at i(i+1)/2. The fp32
        # square root can be off by one near a row boundary; the two corrections fix that (checked
        # exhaustively for the first 3M tiles, i.e. M up to 2448 tiles a side).
        ti = ((tl.sqrt_rn((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        tj = pid - ti * (ti + 1) // 2
        ti = tl.where(tj > ti, ti + 1, ti)
        tj = pid - ti * (ti + 1) // 2
        ti = tl.where(tj < 0, ti - 1, ti)
        tj = pid - ti * (ti + 1) // 2
        bid = tl.program_id(1).to(tl.int64)

        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        p = P + bid * s_pb
        a_ptrs = p + rows[:, None].to(tl.int64) * s_pm + ks[None, :] * s_pk
        b_ptrs = p + cols[:, None].to(tl.int64) * s_pm + ks[None, :] * s_pk
        row_ok, col_ok = rows < M, cols < M
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks)[None, :] < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_pk
            b_ptrs += BLOCK_K * s_pk

        acc = acc * alpha
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_D:  # fused epilogue: + beta·D, D symmetric so its tile's transpose is the mirror's
            d_ptrs = D + bid * s_db + rows[:, None].to(tl.int64) * s_dm + cols[None, :] * s_dn
            acc += beta * tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = acc.to(C.dtype.element_ty)
        c = C + bid * s_cb
        tl.store(c + rows[:, None].to(tl.int64) * s_cm + cols[None, :] * s_cn, out, mask=mask)
        if ti != tj:
            mirror = c + cols[:, None].to(tl.int64) * s_cm + rows[None, :] * s_cn
            tl.store(mirror, tl.trans(out), mask=col_ok[:, None] & row_ok[None, :])


def _fp32_dot() -> str:
    """How fp32 dots run: as torch's own fp32 matmuls do (IEEE unless TF32 was allowed)."""
    if INTERPRET:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check_usable(*tensors: torch.Tensor) -> None:
    if triton is None or not triton_usable(*tensors):
        dev = tensors[0].device.type
        raise RuntimeError(
            f"newton_schulz backend 'triton' cannot run on {dev} tensors (needs CUDA, or TRITON_INTERPRET=1 "
            "set before Triton is imported); use backend 'torch' or 'auto'"
        )


def syrk(
    p: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    d: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha·P·Pᵀ (+ beta·D for a symmetric D) for P of shape (B, M, K): a symmetric (B, M, M) result in
    P's dtype, fp32 accumulation, only the lower-triangular tiles computed (each written to its mirror
    too). ``out`` must not alias ``p`` or ``d``."""
    if p.dim() != 3:
        raise ValueError(f"syrk needs a (batch, M, K) tensor, got shape {tuple(p.shape)}")
    if p.dtype not in _DTYPES:
        raise ValueError(f"syrk supports {_DTYPES}, got {p.dtype}")
    _check_usable(p)
    Bt, M, K = p.shape
    if out is None:
        out = torch.empty(Bt, M, M, dtype=p.dtype, device=p.device)
    if out.shape != (Bt, M, M):
        raise ValueError(f"out must have shape {(Bt, M, M)}, got {tuple(out.shape)}")
    if d is not None and d.shape != (Bt, M, M):
        raise ValueError(f"d must have shape {(Bt, M, M)}, got {tuple(d.shape)}")
    dd = d if d is not None else out  # never read when HAS_D is false
    grid = lambda meta: ((n := triton.cdiv(M, meta["BLOCK"])) * (n + 1) // 2, Bt)  # noqa: E731
    with torch.cuda.device(p.device) if p.is_cuda else contextlib.nullcontext():
        _syrk_kernel[grid](
            p, dd, out, M, K, float(alpha), float(beta),
            *p.stride(), *dd.stride(), *out.stride(),
            HAS_D=d is not None, PRECISION=_fp32_dot(), **LAUNCH,
        )  # fmt: skip
    return out


def newton_schulz_triton(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``newton_schulz_reference`` with the two symmetric matmuls of every step in ``syrk``.

    Same contract: any leading batch dims, Frobenius normalisation, iteration on the wide orientation,
    ``dtype`` bf16 on CUDA and fp32 elsewhere by default, the result in g's dtype. Raises a one-line
    RuntimeError where Triton cannot run (CPU without ``TRITON_INTERPRET=1``).
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"newton_schulz_triton iterates in {_DTYPES}, got {dtype}")
    _check_usable(g)
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, m, n).contiguous()  # one copy: tall inputs arrive transposed
    y = torch.empty_like(x)
    A = torch.empty(x.shape[0], m, m, dtype=dtype, device=x.device)
    B = torch.empty_like(A)
    for _ in range(steps):
        syrk(x, out=A)  # A = X·Xᵀ
        syrk(A, alpha=c, beta=b, d=A, out=B)  # B = c·A·Aᵀ + b·A
        torch.baddbmm(x, B, x, beta=a, alpha=1.0, out=y)  # X ← a·X + B·X
        x, y = y, x
    x = x.reshape(*lead, m, n)
    if tall:
        x = x.mT
    return x.to(g.dtype)
