"""The update kinds a parameter group can take (``group["optimizer"]``), behind one signature.

:class:`~mupfast.optim.optimizer.ClipAdamW` computes every group's clip coefficient, then hands each
kind the parameters of its groups with a :class:`StepInputs`:

* ``adamw``: :class:`AdamWUpdate`, clip and AdamW fused in multi-tensor launches
  (``mupfast.kernels.clip_adamw``);
* ``muon_sphere``: :class:`MuonSphereUpdate`, Muon on the Frobenius sphere (``mupfast.optim.muon``;
  ``mupfast.optim.muon_sharded`` for ZeRO partitions);
* ``adamw_sphere``: :class:`AdamWSphereUpdate`, Adam's direction on the sphere
  (``mupfast.optim.sphere``).

Every kind gates its update on the step's skip flag, on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from mupfast.kernels import clip_adamw as fused
from mupfast.ops.clip_adamw import dispatched_kernels
from mupfast.optim.muon import MOMENTUM, muon_sphere_update
from mupfast.optim.muon_sharded import muon_sphere_update_sharded
from mupfast.optim.sphere import adam_sphere_update


@dataclass(frozen=True)
class StepInputs:
    """What one optimizer step hands every update kind."""

    groups: list[dict]
    """The groups of this call (DeepSpeed's ZeRO shows the optimizer one group per call)."""
    coef: torch.Tensor
    """Each group's clip coefficient, indexed like ``groups``, on the device."""
    skip: torch.Tensor | None
    """A one-element device flag: where set, the update leaves parameters and state as they were."""
    device: torch.device
    shards: dict = field(default_factory=dict)
    """ZeRO: ``id(flat partition) → (partition, GroupShards)`` (``mupfast.distributed.zero_shards``)."""
    process_group: Any = None
    """The data-parallel group the partitions are spread over."""


class Update(Protocol):
    """An update kind: steps ``params`` (``ids``: each one's group index) and their ``state`` in place."""

    def __call__(
        self, params: list[torch.Tensor], ids: list[int], state: dict, inputs: StepInputs
    ) -> None: ...


def group_lr(group: dict) -> float:
    """The group's lr, which a GroupLR (mupfast.optim.schedules) must have set."""
    if "lr" not in group:
        raise RuntimeError(
            f"group {group['name']} has no lr: a GroupLR (mupfast.optim.schedules) sets every group's lr"
        )
    return group["lr"]


def clip_adamw_kernels(backend: str, device: torch.device) -> tuple[Callable, Callable]:
    """(per-group squared norms, clipped AdamW update) for ``device``: under ``auto`` on CUDA, each decided per
    tensor list among Triton and torch's peers (mupfast.ops.clip_adamw); else Triton or torch as asked."""
    if backend == "auto" and device.type == "cuda":
        return dispatched_kernels()
    if backend == "triton":
        return fused.group_sq_norms, fused.clip_adamw_step
    return fused.group_sq_norms_reference, fused.clip_adamw_reference


@dataclass(frozen=True)
class AdamWUpdate:
    """AdamW with the clip coefficient applied to the gradient, decoupled weight decay, and step counts
    on the device: one fused launch per distinct (betas, eps) among the groups (usually one)."""

    backend: str = "auto"
    """auto | torch | triton: the kernels of ``mupfast.kernels.clip_adamw`` (auto: on CUDA decided per tensor list
    among Triton and torch's peers, mupfast.ops.clip_adamw; torch elsewhere)."""

    def kernels(self, device: torch.device) -> tuple[Callable, Callable]:
        return clip_adamw_kernels(self.backend, device)

    def __call__(self, params: list[torch.Tensor], ids: list[int], state: dict, inputs: StepInputs) -> None:
        update_fn = self.kernels(inputs.device)[1]
        states = [_adamw_state(p, state[p]) for p in params]
        # Step counts stay on the device (the bias correction is computed there), and a skipped
        # update does not advance them.
        steps = [st["step"] for st in states]
        skip = inputs.skip
        torch._foreach_add_(steps, 1.0 if skip is None else (~skip.bool()).float().reshape(()))
        lrs = fused.host_to_device([group_lr(g) for g in inputs.groups], torch.float32, inputs.device)
        wds = fused.host_to_device([g["weight_decay"] for g in inputs.groups], torch.float32, inputs.device)
        for (beta1, beta2), eps, idx in _by_betas_eps(inputs.groups, ids):
            update_fn(
                [params[i] for i in idx],
                [params[i].grad for i in idx],
                [states[i]["exp_avg"] for i in idx],
                [states[i]["exp_avg_sq"] for i in idx],
                [ids[i] for i in idx],
                coef=inputs.coef,
                lrs=lrs,
                weight_decays=wds,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                step=steps[idx[0]],  # all tensors advance together
                skip=skip,
            )


def _adamw_state(p: torch.Tensor, st: dict) -> dict:
    """AdamW's state of ``p``: fp32 moments and a device step count, created at the first update."""
    if not st:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    elif st["step"].device != p.device:  # a checkpoint written when steps were on the CPU
        st["step"] = st["step"].to(p.device)
    return st


def _by_betas_eps(groups: list[dict], ids: list[int]) -> list[tuple[tuple[float, float], float, list[int]]]:
    """The tensors (indices into ``ids``) of each distinct (betas, eps) among their groups."""
    split: dict[tuple, list[int]] = {}
    for i, gi in enumerate(ids):
        g = groups[gi]
        split.setdefault((tuple(g["betas"]), g["eps"]), []).append(i)
    return [(betas, eps, idx) for (betas, eps), idx in split.items()]


@dataclass(frozen=True)
class MuonSphereUpdate:
    """MuonH, HyperP's optimizer for the hidden matrices: whole matrices one by one, or a ZeRO partition
    (every rank together, gathering whole matrices for Newton–Schulz)."""

    momentum: float = MOMENTUM
    ns_backend: str = "auto"
    """auto | torch | triton: how Newton–Schulz runs (``mupfast.optim.muon.newton_schulz``)."""

    def __call__(self, params: list[torch.Tensor], ids: list[int], state: dict, inputs: StepInputs) -> None:
        for p, gi in zip(params, ids):
            kw = dict(lr=group_lr(inputs.groups[gi]), coef=inputs.coef[gi], beta=self.momentum)
            if id(p) in inputs.shards:
                shards = inputs.shards[id(p)][1]
                update = partial(
                    muon_sphere_update_sharded, p, p.grad, state[p], shards,
                    process_group=inputs.process_group, ns_backend=self.ns_backend, **kw,
                )  # fmt: skip
            else:
                update = partial(muon_sphere_update, p, p.grad, state[p], ns_backend=self.ns_backend, **kw)
            unless_skipped(inputs.skip, p, state[p], update)


@dataclass(frozen=True)
class AdamWSphereUpdate:
    """AdamH, HyperP's optimizer for the untied readout: Adam's direction taken as a relative step on
    the sphere; elementwise, so a ZeRO partition needs only its norms summed over the ranks."""

    def __call__(self, params: list[torch.Tensor], ids: list[int], state: dict, inputs: StepInputs) -> None:
        for p, gi in zip(params, ids):
            group, where = inputs.groups[gi], {}
            if id(p) in inputs.shards:
                shards = inputs.shards[id(p)][1]
                seg = shards.segment_ids(p.device)
                where = dict(seg=seg, n=len(shards.shapes), process_group=inputs.process_group)
            update = partial(
                adam_sphere_update, p, p.grad, state[p],
                lr=group_lr(group), coef=inputs.coef[gi], betas=group["betas"], eps=group["eps"], **where,
            )  # fmt: skip
            unless_skipped(inputs.skip, p, state[p], update)


def unless_skipped(
    skip: torch.Tensor | None, p: torch.Tensor, state: dict, update: Callable[[], None]
) -> None:
    """Run ``update`` of ``p`` and its ``state``; where ``skip`` is set, undo it on the device.

    For the updates that are not one fused launch (Muon, AdamH): one copy of the matrix and its state
    is kept through the update. State the update created starts at zero, as it would have
    (the sphere radius excepted: it is ‖p‖, which a skipped update leaves unchanged).
    """
    if skip is None:
        update()
        return
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    p_before = p.detach().clone()
    update()
    keep = skip.bool().reshape(())
    p.copy_(torch.where(keep, p_before, p))
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and k != "radius":
            v.copy_(torch.where(keep, before.get(k, torch.zeros_like(v)), v))
