"""MuonH on a ZeRO partition: the update of ``mupfast.muon.muon_sphere_update``, matrix by matrix.

Under ZeRO each rank holds a flat slice of a group that cuts through its matrices
(``mupfast.zero_shards.GroupShards`` says where). Momentum and the Nesterov look-ahead are
elementwise, so each rank keeps them for its own slice only. Newton–Schulz needs whole matrices:
the look-ahead partitions of the group are all-gathered (one collective per group and step) and
every rank orthogonalises the matrices it holds a piece of, keeping its own piece of the result.

We gather per group rather than assign whole matrices to ranks because DeepSpeed decides the
partitioning (equal flat slices at stages 1/2, a slice of every matrix at stage 3), and
re-partitioning by matrix would mean owning ZeRO's memory layout. The price is redundant
Newton–Schulz work where a matrix spans several ranks (all of them at stage 3), and a transient
buffer of the group's full size.

The relative step and the projection back onto the sphere are ``mupfast.sphere.sphere_step``, which
sums the Frobenius norms of ‖W‖ and ‖U‖ over the ranks' slices (two all-reduces).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mupfast.muon import MOMENTUM, newton_schulz
from mupfast.sphere import sphere_step
from mupfast.zero_shards import GroupShards


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
    n = len(shards.shapes)
    seg = shards.segment_ids(p.device)
    g = grad.float() * coef
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
    buf = state["momentum_buffer"]
    buf.lerp_(g, 1 - beta)
    gathered = _gather(g.lerp(buf, beta), len(shards.ranks), process_group)

    u_local = torch.zeros_like(buf)
    held = {f.matrix for f in shards.local}
    for k in sorted(held):
        pieces = [gathered[r, f.offset : f.offset + f.length] for r, f in shards.by_matrix[k]]
        u = newton_schulz(torch.cat(pieces).view(shards.shapes[k]), backend=ns_backend).reshape(-1)
        for f in shards.local:
            if f.matrix == k:
                u_local[f.offset : f.offset + f.length] = u[f.start : f.start + f.length]
    sphere_step(p, u_local, state, lr=lr, seg=seg, n=n, process_group=process_group)
