"""What DeepSpeed's ZeRO optimizers hand our optimizer, read once so the optimizer needn't know.

Under ZeRO 1–3 (and DeepSpeed's bf16 ZeRO-1 optimizer) our optimizer sees each group as one flat
fp32 partition per rank, and at stages 1–3 DeepSpeed calls its ``step`` once per group. ``attach``
wraps the ZeRO optimizer's ``step`` so that the squared gradient norms of all groups are all-reduced
in one collective before that loop; ``GroupShards`` records which slice of which matrix sits where
in every rank's partition, so Muon can gather whole matrices (``mupfast.optim.muon_sharded``).

The DeepSpeed layouts read here (checked against 0.19): stages 1/2 flatten a group's parameters in
``round_robin_bit16_groups`` order at ``round_robin_bit16_offsets`` and give rank r the elements
[r·P, (r+1)·P); stage 3 partitions every parameter on its own (``ds_tensor``: P_p elements each) and
concatenates a sub-group's partitions; bf16 ZeRO-1 flattens ``bf16_groups`` contiguously. Each
layout is checked against the partition DeepSpeed built, so another layout fails loudly at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mupfast.parametrization import SPHERE_OPTIMIZERS


class ZeroLayoutError(RuntimeError):
    """DeepSpeed's partition layout is not the one this module knows (another DeepSpeed version)."""


@dataclass(frozen=True)
class Fragment:
    """Elements [start, start + length) of matrix ``matrix`` (flattened), at ``offset`` in a partition."""

    matrix: int
    offset: int
    start: int
    length: int


@dataclass
class GroupShards:
    """Where every rank's flat partition of one group keeps the pieces of the group's matrices."""

    shapes: list[torch.Size]
    partition_numel: int
    ranks: list[list[Fragment]]  # ranks[r]: rank r's fragments, in partition order
    rank: int
    by_matrix: list[list[tuple[int, Fragment]]] = field(init=False)
    _segment_ids: tuple[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _owned: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.by_matrix = [[] for _ in self.shapes]
        for r, frags in enumerate(self.ranks):
            for f in frags:
                self.by_matrix[f.matrix].append((r, f))
        for k, pieces in enumerate(self.by_matrix):
            pieces.sort(key=lambda rf: rf[1].start)
            covered = sum(f.length for _, f in pieces)
            if covered != self.shapes[k].numel():
                raise ZeroLayoutError(
                    f"matrix {k}: partitions cover {covered} of {self.shapes[k].numel()} elements"
                )

    @property
    def local(self) -> list[Fragment]:
        return self.ranks[self.rank]

    def owned(self) -> list[int]:
        """The matrices this rank orthogonalises: each matrix goes to one of the ranks holding a piece
        of it, greedily balancing Newton–Schulz flops (m·n·min(m, n)); the same answer on every rank."""
        if self._owned is None:
            load = [0] * len(self.ranks)
            owner = {}
            cost = [s[0] * s[1] * min(s[0], s[1]) if len(s) == 2 else s.numel() for s in self.shapes]
            for k in sorted(range(len(self.shapes)), key=lambda k: (-cost[k], k)):
                holders = sorted({r for r, _ in self.by_matrix[k]})
                owner[k] = min(holders, key=lambda r: (load[r], r))
                load[owner[k]] += cost[k]
            self._owned = sorted(k for k, r in owner.items() if r == self.rank)
        return self._owned

    def segment_ids(self, device) -> torch.Tensor:
        """For each element of this rank's partition, the index of its matrix (padding: len(shapes))."""
        key = str(device)
        if self._segment_ids is None or self._segment_ids[0] != key:
            ids = torch.full((self.partition_numel,), len(self.shapes), dtype=torch.long)
            for f in self.local:
                ids[f.offset : f.offset + f.length] = f.matrix
            self._segment_ids = (key, ids.to(device))
        return self._segment_ids[1]


def contiguous_fragments(
    offsets: list[int], numels: list[int], partition_numel: int, world: int
) -> list[list[Fragment]]:
    """Fragments of tensors laid at ``offsets`` in one flat buffer cut into ``world`` equal partitions."""
    ranks: list[list[Fragment]] = []
    for r in range(world):
        lo, hi = r * partition_numel, (r + 1) * partition_numel
        frags = []
        for k, (off, n) in enumerate(zip(offsets, numels)):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                frags.append(Fragment(k, a - lo, a - off, b - a))
        ranks.append(frags)
    return ranks


def per_tensor_fragments(numels: list[int], partition_numels: list[int], world: int) -> list[list[Fragment]]:
    """Fragments when each tensor is split on its own into ``world`` parts and the parts concatenated."""
    ranks: list[list[Fragment]] = []
    for r in range(world):
        frags, offset = [], 0
        for k, (n, pn) in enumerate(zip(numels, partition_numels)):
            length = max(0, min(pn, n - r * pn))
            if length:
                frags.append(Fragment(k, offset, r * pn, length))
            offset += pn
        ranks.append(frags)
    return ranks


def _kind(zero_optimizer) -> str | None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, kind in [(DeepSpeedZeroOptimizer_Stage3, "stage3"), (DeepSpeedZeroOptimizer, "stage12"),
                      (BF16_Optimizer, "bf16")]:  # fmt: skip
        if isinstance(zero_optimizer, cls):
            return kind
    return None


def _partitions(zero_optimizer, kind: str) -> list[tuple[int, torch.Tensor, list, GroupShards]]:
    """(client group index, flat fp32 partition, its model parameters, shards) per partition."""
    rank, world = dist.get_rank(), dist.get_world_size()
    zo = zero_optimizer
    found = []  # (group index, partition, params, shapes, fragments)
    if kind == "stage12":
        for i, params in enumerate(zo.round_robin_bit16_groups):
            part = zo.single_partition_of_fp32_groups[i]
            shapes = [m.shape for m in zo.round_robin_bit16_meta[i]]
            offsets = zo.round_robin_bit16_offsets[i]
            frags = contiguous_fragments(offsets, [s.numel() for s in shapes], part.numel(), world)
            found.append((i, part, params, shapes, frags))
    elif kind == "stage3":
        for s, params in enumerate(zo.fp16_groups):
            part, pns = zo.fp32_partitioned_groups_flat[s], [p.partition_numel() for p in params]
            if part.numel() != sum(pns):
                raise ZeroLayoutError(f"partition has {part.numel()} elements, layout expects {sum(pns)}")
            frags = per_tensor_fragments([p.ds_numel for p in params], pns, world)
            found.append((zo.sub_group_to_group_id[s], part, params, [p.ds_shape for p in params], frags))
    else:  # bf16 ZeRO-1: contiguous, padded only at the end
        for i, params in enumerate(zo.bf16_groups):
            part = zo.fp32_groups_flat_partition[i]
            numels = [p.numel() for p in params]
            offsets = [sum(numels[:k]) for k in range(len(numels))]
            frags = contiguous_fragments(offsets, numels, part.numel(), world)
            found.append((i, part, params, [p.shape for p in params], frags))
    return [
        (gi, part, params, GroupShards(shapes, part.numel(), frags, rank))
        for gi, part, params, shapes, frags in found
    ]


def group_partitions(zero_optimizer) -> list[tuple[int, torch.Tensor]]:
    """(client group index, flat fp32 partition) of every partition this rank holds (none outside ZeRO
    1–3): at ZeRO-3 the client optimizer's groups list their partitions only during its step."""
    kind = _kind(zero_optimizer)
    return [] if kind is None else [(gi, part) for gi, part, _, _ in _partitions(zero_optimizer, kind)]


def _check_against_local_weights(part: torch.Tensor, params: list, shards: GroupShards, kind: str) -> None:
    """The fp32 partition must hold exactly the model weights the layout says it holds."""
    for f in shards.local:
        p = params[f.matrix]
        full = p.ds_tensor if kind == "stage3" else p.detach().reshape(-1)
        got = part[f.offset : f.offset + f.length]
        want = full[: f.length] if kind == "stage3" else full[f.start : f.start + f.length]
        if not torch.equal(got.to(want.dtype), want):
            raise ZeroLayoutError(
                f"partition layout mismatch at matrix {f.matrix} (DeepSpeed's layout changed?)"
            )


def local_group_sq_norms(zero_optimizer, kind: str, num_groups: int, device, sq_norms) -> torch.Tensor:
    """This rank's squared gradient norm of every client group (sub-groups summed into their group),
    computed by ``sq_norms`` (the optimizer's multi-tensor norm pass) over the gradient partitions."""
    zo = zero_optimizer
    if kind == "stage12":
        items = [(i, zo.averaged_gradients.get(i)) for i in range(len(zo.round_robin_bit16_groups))]
    else:
        items = [
            (zo.sub_group_to_group_id[s], zo.averaged_gradients.get(s)) for s in range(len(zo.fp16_groups))
        ]
    grads, ids = [], []
    for gi, group_grads in items:
        if group_grads is None:
            continue
        flat = getattr(group_grads, "flat_partition", None)  # stage 1/2 may keep one pre-flattened buffer
        for g in [flat] if flat is not None else group_grads:
            grads.append(g)
            ids.append(gi)
    return sq_norms(grads, ids, num_groups, device=device)


def attach(engine, client_optimizer) -> None:
    """Connect our optimizer to the ZeRO optimizer wrapping it (no-op at stage 0).

    Gives it the shards of every flat partition (for Muon), and at stages 1–3 wraps the ZeRO
    optimizer's ``step`` so that all groups' squared norms are all-reduced in one collective first.
    """
    zo = engine.optimizer
    kind = _kind(zo)
    if kind is None:
        return
    if getattr(zo, "cpu_offload", False) or getattr(zo, "offload_optimizer", False):
        # Offloaded partitions live elsewhere: norms fall back to one collective per group call.
        if any(g.get("optimizer") in SPHERE_OPTIMIZERS for g in client_optimizer.param_groups):
            raise ZeroLayoutError("hyperp (MuonH, AdamH) does not support ZeRO optimizer offload")
        return
    shards = {}
    for gi, part, params, gs in _partitions(zo, kind):
        if client_optimizer.param_groups[gi].get("optimizer") in SPHERE_OPTIMIZERS:
            _check_against_local_weights(part, params, gs, kind)
        shards[id(part)] = (part, gs)
    client_optimizer.shards = shards
    if kind == "bf16":  # DeepSpeed's bf16 ZeRO-1 steps all groups in one call: norms reduce there
        return
    original_step = zo.step
    n = len(client_optimizer.param_groups)
    device = next(iter(shards.values()))[0].device
    sq_norms = client_optimizer.kernels(device)[0]

    def step(*args, **kwargs):
        if client_optimizer.skip_step is not True:
            sq = local_group_sq_norms(zo, kind, n, device, sq_norms)
            dist.all_reduce(sq, group=client_optimizer.process_group)
            client_optimizer.pending_sq_norms = sq
        try:
            return original_step(*args, **kwargs)
        finally:
            client_optimizer.pending_sq_norms = None

    zo.step = step
