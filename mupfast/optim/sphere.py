"""Training on the Frobenius sphere, the step MuonH and AdamH share (HyperP, arXiv 2603.28743; its
code: microsoft/ArchScale), and AdamH itself.

Given an update direction U for a matrix W (Muon's orthogonalised momentum, or Adam's bias-corrected
m̂/(√v̂+ε)), one step is

    W ← W − η·(‖W‖_F/‖U‖_F)·U          a relative step: ‖ΔW‖/‖W‖ = η whatever the width
    W ← W·r/‖W‖_F                      back onto the sphere, r = ‖W₀‖_F recorded at the first step

``sphere_step`` does it for one whole matrix, or for the slices of several matrices in a flat ZeRO
partition (``seg`` maps each element to its matrix), summing the norms over the ranks.
``adam_sphere_update`` is AdamH, HyperP's optimizer for the untied readout. No weight decay: on the
sphere it has no first-order effect.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _sq_norms(x: torch.Tensor, seg: torch.Tensor | None, n: int) -> torch.Tensor:
    if seg is None:
        return x.pow(2).sum().reshape(1)
    return torch.zeros(n + 1, dtype=torch.float32, device=x.device).index_add_(0, seg, x.pow(2))[:n]


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def _per_element(values: torch.Tensor, seg: torch.Tensor | None, padding: float) -> torch.Tensor:
    if seg is None:
        return values
    return torch.cat([values, values.new_full((1,), padding)])[seg]


@torch.no_grad()
def sphere_step(
    p: torch.Tensor,
    u: torch.Tensor,
    state: dict,
    *,
    lr: float,
    seg: torch.Tensor | None = None,
    n: int = 1,
    process_group=None,
) -> None:
    """The relative step along ``u`` and the projection back to the recorded radius, per matrix.

    ``state["radius"]`` is set at the first call. A matrix whose direction is zero stays where it is.
    """
    w = p.float().reshape(-1)
    u = u.float().reshape(-1)
    sq = _all_reduce(torch.cat([_sq_norms(w, seg, n), _sq_norms(u, seg, n)]), process_group)
    w_norm, u_norm = sq[:n].sqrt(), sq[n:].sqrt()
    if "radius" not in state:
        state["radius"] = w_norm.clone() if seg is not None else w_norm[0].clone()
    scale = torch.where(u_norm > 0, w_norm / u_norm.clamp_min(1e-30), torch.zeros_like(u_norm))
    w = w - (lr * _per_element(scale, seg, 0.0)) * u
    new_norm = _all_reduce(_sq_norms(w, seg, n), process_group).sqrt()
    factor = state["radius"] / new_norm.clamp_min(1e-30)
    w = w * _per_element(factor, seg, 1.0)
    p.copy_(w.view_as(p))


@torch.no_grad()
def adam_sphere_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    coef: torch.Tensor | float = 1.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    seg: torch.Tensor | None = None,
    n: int = 1,
    process_group=None,
) -> None:
    """One AdamH step of ``p`` in place: Adam's direction, taken as a relative step on the sphere."""
    g = grad.float() * coef
    if "exp_avg" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=g.device)
        state["exp_avg"] = torch.zeros_like(g)
        state["exp_avg_sq"] = torch.zeros_like(g)
    elif state["step"].device != g.device:  # a checkpoint written when steps were on the CPU
        state["step"] = state["step"].to(g.device)
    state["step"] += 1
    beta1, beta2 = betas
    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    sphere_step(p, u, state, lr=lr, seg=seg, n=n, process_group=process_group)
