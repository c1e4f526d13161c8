"""Muon on the Frobenius sphere (HyperP's "MuonH", research/mup-anchors.md §B).

For every hidden matrix W with gradient G (already clipped by its group's coefficient):

    M ← β·M + (1−β)·G                       momentum (β = 0.95)
    U ← NS5((1−β)·G + β·M)                   Nesterov look-ahead, orthogonalised by Newton–Schulz
    W ← W − η·(‖W‖_F/‖U‖_F)·U                relative step size η
    W ← W·r/‖W‖_F                            back onto the sphere, r = ‖W₀‖_F recorded at the first step

The radius is recorded once and re-imposed every step, so it cannot drift; weight decay has no
first-order effect on the sphere and is not applied. ``newton_schulz`` is the quintic iteration
with the coefficients (3.4445, −4.7750, 2.0315) the anchors use: it maps every singular value of
the normalised input into a band around 1 (not exactly 1: tests/test_muon.py pins the band),
working in fp32 on CPU and bf16 on GPU, on the wide orientation (tall inputs are transposed).
"""

from __future__ import annotations

import torch

#: Quintic Newton–Schulz coefficients (a, b, c): X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix (or a batch of them): U·Vᵀ of its SVD, same shape.

    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere; the result is returned in g's dtype.
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


@torch.no_grad()
def muon_sphere_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    coef: torch.Tensor | float = 1.0,
    beta: float = MOMENTUM,
) -> None:
    """One MuonH step of ``p`` in place; ``state`` holds its momentum buffer and sphere radius.

    ``coef`` is the group's clip coefficient (a device tensor: no host sync). The radius is
    ‖p‖_F at the first call. A matrix with a zero gradient (or zero radius) is left unchanged.
    """
    w = p.float()
    g = grad.float() * coef
    if not state:
        state["momentum_buffer"] = torch.zeros_like(w)
        state["radius"] = w.norm()
    buf = state["momentum_buffer"]
    buf.lerp_(g, 1 - beta)
    u = newton_schulz(g.lerp(buf, beta))
    u_norm = u.norm()
    # ‖W‖_F/‖U‖_F, guarded: a zero update (all-zero grad and momentum) leaves W where it is.
    scale = torch.where(u_norm > 0, w.norm() / u_norm.clamp_min(1e-30), torch.zeros_like(u_norm))
    w = w - (lr * scale) * u
    radius = state["radius"]
    w = w * (radius / w.norm().clamp_min(1e-30))
    p.copy_(w)
