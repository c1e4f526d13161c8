"""MuonH: Muon on the Frobenius sphere, HyperP's optimizer for the hidden matrices
(HyperP, arXiv 2603.28743; its code: microsoft/ArchScale, ``lit_gpt/optim/muon.py``).

For a matrix W with gradient G (already clipped by its group's coefficient):

    M ← β·M + (1−β)·G                       momentum (β = 0.95)
    U ← NS5((1−β)·G + β·M)                   Nesterov look-ahead, orthogonalised by Newton–Schulz
    W ← W − η·(‖W‖_F/‖U‖_F)·U                relative step size η
    W ← W·r/‖W‖_F                            back onto the sphere, r = ‖W₀‖_F recorded at the first step

No weight decay: on the sphere it has no first-order effect. ``newton_schulz`` is the quintic
iteration with coefficients (3.4445, −4.7750, 2.0315), in fp32 on CPU and bf16 on GPU; its two
implementations (torch matmuls, and a Triton one that computes half of the symmetric products) are
in ``mupfast.kernels.newton_schulz``.
"""

from __future__ import annotations

import torch

from mupfast.kernels.newton_schulz import NS_COEFFS, NS_STEPS, newton_schulz_reference, newton_schulz_triton
from mupfast.ops.newton_schulz import newton_schulz_auto
from mupfast.optim.sphere import sphere_step

__all__ = [
    "NS_COEFFS",
    "NS_STEPS",
    "MOMENTUM",
    "MOMENTUM_KEY",
    "AUTO_NS_BACKEND",
    "newton_schulz",
    "muon_sphere_update",
]

MOMENTUM = 0.95
#: Where a Muon state keeps its momentum: Adam's first-moment key, which DeepSpeed's universal
#: checkpoint carries (see ``nesterov_look_ahead``).
MOMENTUM_KEY = "exp_avg"
#: The implementation ``backend="auto"`` picks off CUDA; on CUDA it is decided per shape among the Triton
#: kernel and compiled and eager torch, each checked against the fp64 iteration (mupfast.ops.newton_schulz).
AUTO_NS_BACKEND = "torch"
NS_BACKENDS = ("auto", "torch", "triton")


def newton_schulz(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Approximately orthogonalise a matrix (or a batch of them): U·Vᵀ of its SVD, same shape.

    ``dtype`` defaults to bf16 on CUDA and fp32 elsewhere; the result is returned in g's dtype.
    ``backend``: ``torch`` (plain matmuls), ``triton`` (mupfast.kernels.newton_schulz: symmetric
    matmuls for X·Xᵀ and A·A, a one-line error where Triton cannot run) or ``auto`` (AUTO_NS_BACKEND off
    CUDA; on CUDA the fastest right one for the shape).
    """
    if backend == "auto":
        if g.is_cuda:  # the fastest right candidate for the shape (mupfast.ops.newton_schulz)
            return newton_schulz_auto(g, steps, dtype)
        backend = AUTO_NS_BACKEND
    if backend == "torch":
        return newton_schulz_reference(g, steps, dtype)
    if backend == "triton":
        return newton_schulz_triton(g, steps, dtype)
    raise ValueError(f"newton_schulz backend must be one of {', '.join(NS_BACKENDS)} (got {backend!r})")


@torch.no_grad()
def muon_sphere_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    coef: torch.Tensor | float = 1.0,
    beta: float = MOMENTUM,
    ns_backend: str = "auto",
) -> None:
    """One MuonH step of ``p`` in place; ``state`` holds its momentum (``exp_avg``) and sphere radius.

    ``coef`` is the group's clip coefficient (a device tensor: no host sync). The radius is
    ‖p‖_F at the first call. A matrix with a zero gradient (or zero radius) is left unchanged.
    """
    look_ahead = nesterov_look_ahead(grad, state, coef=coef, beta=beta)
    sphere_step(p, newton_schulz(look_ahead, backend=ns_backend), state, lr=lr)


def nesterov_look_ahead(grad: torch.Tensor, state: dict, *, coef, beta: float) -> torch.Tensor:
    """M ← β·M + (1−β)·G for the clipped gradient G (M kept in ``state``); returns (1−β)·G + β·M.

    Elementwise, so it serves a whole matrix and a ZeRO slice of one alike. M is an exponential
    average of the gradients, as Adam's first moment is, and is kept under Adam's name ``exp_avg``:
    DeepSpeed's universal checkpoint re-partitions that key by parameter, so the momentum goes along
    when a run resumes on another number of ranks or ZeRO stage (``mupfast.distributed.elastic``).
    Checkpoints written before kept it as ``momentum_buffer`` (``ClipAdamW.load_state_dict`` renames)."""
    g = grad.float() * coef
    if MOMENTUM_KEY not in state:
        state[MOMENTUM_KEY] = torch.zeros_like(g)
    buf = state[MOMENTUM_KEY]
    buf.lerp_(g, 1 - beta)
    return g.lerp(buf, beta)
