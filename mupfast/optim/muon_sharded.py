"""MuonH on a ZeRO partition: ``mupfast.optim.muon.muon_sphere_update`` for a flat slice of a group.

Each rank holds a flat slice that cuts through the group's matrices
(``mupfast.distributed.zero_shards.GroupShards`` says where). Momentum and the Nesterov look-ahead are
elementwise, so each rank keeps them for its own slice. Newton–Schulz needs whole matrices: the
look-ahead slices are all-gathered, each matrix is orthogonalised once by one of the ranks holding
a piece of it (``GroupShards.owned``), and a reduce-scatter hands every rank its slice of the
results; ``mupfast.optim.sphere.sphere_step`` then takes the step with norms summed over the ranks.
DeepSpeed decides the partitioning, so we gather rather than re-partition by matrix: two transient
group-sized buffers and two group-sized collectives per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mupfast.distributed.zero_shards import GroupShards
from mupfast.optim.muon import MOMENTUM, nesterov_look_ahead, newton_schulz
from mupfast.optim.sphere import sphere_step


def _reduce_scatter(rows: torch.Tensor, group) -> torch.Tensor:
    """Row r of the sum over ranks of ``rows`` (world, P), on rank r."""
    out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    # reduce_scatter_single is the name since torch 2.13; reduce_scatter_tensor before it
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, rows.reshape(-1), group=group)
    return out


def _gather(local: torch.Tensor, world: int, group) -> torch.Tensor:
    if world == 1:
        return local.view(1, -1)
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather(list(out.chunk(world)), local.contiguous(), group=group)
    return out.view(world, -1)


@torch.no_grad()
def muon_sphere_update_sharded(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    shards: GroupShards,
    *,
    lr: float,
    coef: torch.Tensor | float = 1.0,
    beta: float = MOMENTUM,
    process_group=None,
    ns_backend: str = "auto",
) -> None:
    """One MuonH step of the flat fp32 partition ``p`` in place (every rank calls it together)."""
    world = len(shards.ranks)
    gathered = _gather(nesterov_look_ahead(grad, state, coef=coef, beta=beta), world, process_group)

    # Each matrix is orthogonalised once, by its owner, and written at every rank's slice of it;
    # the reduce-scatter then hands each rank its own slice (only the owner's entry is non-zero).
    contrib = torch.zeros_like(gathered)
    for k in shards.owned():
        pieces = [gathered[r, f.offset : f.offset + f.length] for r, f in shards.by_matrix[k]]
        u = newton_schulz(torch.cat(pieces).view(shards.shapes[k]), backend=ns_backend).reshape(-1)
        for r, f in shards.by_matrix[k]:
            contrib[r, f.offset : f.offset + f.length] = u[f.start : f.start + f.length]
    u_local = contrib[0] if world == 1 else _reduce_scatter(contrib, process_group)
    seg = shards.segment_ids(p.device)
    sphere_step(p, u_local, state, lr=lr, seg=seg, n=len(shards.shapes), process_group=process_group)
