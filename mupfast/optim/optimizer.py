"""The clip+AdamW optimizer over the μP parameter groups, and :func:`build_optimizer`.

:class:`ClipAdamW` clips each group's gradient norm to its own ``max_grad_norm`` and applies
AdamW in one fused pass (``mupfast.kernels.clip_adamw``). Under ZeRO 1–3 each rank holds a
partition of every group, so the per-group squared norms are all-reduced first, all groups in one
collective (``mupfast.distributed.zero_shards.attach`` computes them before DeepSpeed's per-group loop).
Groups whose rule says ``optimizer = "muon_sphere"`` (hyperp's hidden matrices) take the
Muon-on-the-sphere update of ``mupfast.optim.muon`` instead, with the same per-group clipping; under ZeRO
their flat partitions go through ``mupfast.optim.muon_sharded``, which gathers whole matrices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mupfast.config import Config
from mupfast.kernels import clip_adamw as fused
from mupfast.optim.groups import base_lr, build_param_groups
from mupfast.optim.muon import muon_sphere_update
from mupfast.optim.muon_sharded import muon_sphere_update_sharded
from mupfast.optim.schedules import GroupLR, build_schedule
from mupfast.optim.sphere import adam_sphere_update
from mupfast.parametrization import SPHERE_OPTIMIZERS


class ClipAdamW(torch.optim.Optimizer):
    """AdamW with per-group gradient-norm clipping fused into the update.

    ``reduce_norms`` all-reduces the per-group squared norms over ``process_group`` (ZeRO ≥ 1, where
    each rank holds a partition of every group); leave it off when gradients are replicated.
    ``newton_schulz_backend`` (auto | torch | triton) is how Muon groups orthogonalise (mupfast.optim.muon).
    After each step ``last_grad_norms`` and ``last_clip_coefs`` hold the pre-clip norm and the
    coefficient of every group (device tensors, keyed by group name).

    Every group's ``lr`` is set by a :class:`~mupfast.optim.schedules.GroupLR` (``build_optimizer``
    attaches one); the optimizer has no lr of its own, and a group without one is an error.
    The other group hyperparameters (``betas``, ``eps``, ``weight_decay``, ``max_grad_norm``) are read
    from ``param_groups`` at every step, per group, as in torch's optimizers: a change made between
    steps (PBT's explore) applies to the very next update.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        global_max_norm: float = 0.0,
        backend: str = "auto",
        reduce_norms: bool = False,
        process_group=None,
        muon_momentum: float = 0.95,
        newton_schulz_backend: str = "auto",
    ):
        defaults = dict(betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=0.0, optimizer="adamw")
        super().__init__(param_groups, defaults)
        self.muon_momentum = muon_momentum
        self.newton_schulz_backend = newton_schulz_backend
        self.global_max_norm = global_max_norm
        self.backend = backend
        self.reduce_norms = reduce_norms
        self.process_group = process_group
        self.last_grad_norms: dict[str, torch.Tensor] = {}
        self.last_clip_coefs: dict[str, torch.Tensor] = {}
        # DeepSpeed may show us one group per call: slots and thresholds of all groups, by name.
        self._slot = {g["name"]: i for i, g in enumerate(self.param_groups)}
        # Every group's clip threshold by slot, refreshed from the groups of each step (a group DeepSpeed
        # does not show this step keeps its last value; it is not clipped in this call anyway).
        self._max_norms = [g["max_grad_norm"] for g in self.param_groups]
        # Set by mupfast.distributed.zero_shards.attach under ZeRO: every group's all-reduced squared norm for
        # the step in progress, and the layout of each flat partition (for Muon).
        self.pending_sq_norms: torch.Tensor | None = None
        self.shards: dict = {}
        # Set by the trainer when the loss was non-finite on some rank: the update is skipped whole
        # (no parameter, moment or step-count changes), on every rank alike. True skips at once; a
        # one-element device tensor is read by the update itself, so the host never waits for it.
        self.skip_step: bool | torch.Tensor = False

    def kernels(self, device: torch.device):
        """(per-group squared norms, clipped AdamW update) for ``device``: Triton on CUDA, else torch."""
        use_triton = self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")
        if use_triton:
            return fused.group_sq_norms, fused.clip_adamw_step
        return fused.group_sq_norms_reference, fused.clip_adamw_reference

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        if self.skip_step is True:
            return loss
        skip = self.skip_step if isinstance(self.skip_step, torch.Tensor) else None
        # Every group keeps its slot (zero norm when it has no gradient here), so the norm vector
        # has the same length on every rank and the all-reduce lines up.
        params, grads, m, v, ids = [], [], [], [], []
        sphere = []  # (param, group index): MuonH / AdamH groups, updated after the clip coefficients
        all_grads, all_ids = [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if group["optimizer"] in SPHERE_OPTIMIZERS:
                    if p.ndim != 2 and id(p) not in self.shards:
                        raise ValueError(
                            f"group {group['name']}: {group['optimizer']} needs whole matrices, got {tuple(p.shape)}"
                        )
                    sphere.append((p, gi))
                    all_grads.append(p.grad)
                    all_ids.append(gi)
                    continue
                all_grads.append(p.grad)
                all_ids.append(gi)
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(
                        p, dtype=torch.float32, memory_format=torch.preserve_format
                    )
                    st["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=torch.float32, memory_format=torch.preserve_format
                    )
                elif st["step"].device != p.device:  # a checkpoint written when steps were on the CPU
                    st["step"] = st["step"].to(p.device)
                params.append(p)
                grads.append(p.grad)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                ids.append(gi)
        groups = self.param_groups
        device = all_grads[0].device if all_grads else self._device(groups)
        sq_norms_fn, update_fn = self.kernels(device)
        f32 = dict(dtype=torch.float32, device=device)
        # Host values reach the device through pinned memory: a blocking copy would sync the stream.
        slots = fused.host_to_device([self._slot[g["name"]] for g in groups], torch.long, device)
        if self.pending_sq_norms is not None:  # ZeRO: all groups' norms, reduced in one collective
            sq_all = self.pending_sq_norms.to(device)
            logged = list(self._slot)
        else:
            sq = sq_norms_fn(all_grads, all_ids, len(groups), device=device)
            if self.reduce_norms and dist.is_available() and dist.is_initialized():
                dist.all_reduce(sq, group=self.process_group)
            if len(groups) < len(self._slot) and self.global_max_norm > 0:
                raise RuntimeError(
                    "clip.global_max_norm needs every group's norm in one step (not under ZeRO offload)"
                )
            sq_all = torch.zeros(len(self._slot), **f32).index_copy_(0, slots, sq)
            logged = [g["name"] for g in groups if g["params"]]
        for g in groups:
            self._max_norms[self._slot[g["name"]]] = g["max_grad_norm"]
        max_norms = fused.host_to_device(self._max_norms, torch.float32, device)
        coef_all = fused.clip_coefficients(sq_all, max_norms, self.global_max_norm)
        coef = coef_all[slots]
        if params:
            # Step counts stay on the device (the bias correction is computed there), and a skipped
            # update does not advance them.
            steps = [self.state[q]["step"] for q in params]
            torch._foreach_add_(steps, 1.0 if skip is None else (~skip.bool()).float().reshape(()))
            lrs = fused.host_to_device([self._lr(g) for g in groups], torch.float32, device)
            wds = fused.host_to_device([g["weight_decay"] for g in groups], torch.float32, device)
            # One fused launch per distinct (betas, eps): one launch in the usual case where all
            # groups share them, and each group's own values when they differ.
            for (beta1, beta2), eps, idx in _by_betas_eps(groups, ids):
                update_fn(
                    [params[i] for i in idx],
                    [grads[i] for i in idx],
                    [m[i] for i in idx],
                    [v[i] for i in idx],
                    [ids[i] for i in idx],
                    coef=coef,
                    lrs=lrs,
                    weight_decays=wds,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    step=steps[idx[0]],  # all tensors advance together
                    skip=skip,
                )
        for p, gi in sphere:
            unless_skipped(
                skip, p, self.state[p], lambda p=p, gi=gi: self._sphere_update(p, groups[gi], coef[gi])
            )
        norms = sq_all.sqrt()
        for name in logged:
            self.last_grad_norms[name] = norms[self._slot[name]]
            self.last_clip_coefs[name] = coef_all[self._slot[name]]
        return loss

    def _sphere_update(self, p: torch.Tensor, group: dict, coef: torch.Tensor) -> None:
        """MuonH (hidden matrices) or AdamH (hyperp's readout): whole matrices, or a ZeRO partition."""
        shards = self.shards[id(p)][1] if id(p) in self.shards else None
        if group["optimizer"] == "muon_sphere":
            kw = dict(
                lr=self._lr(group), coef=coef, beta=self.muon_momentum, ns_backend=self.newton_schulz_backend
            )
            if shards is not None:
                muon_sphere_update_sharded(
                    p, p.grad, self.state[p], shards, process_group=self.process_group, **kw
                )
            else:
                muon_sphere_update(p, p.grad, self.state[p], **kw)
            return
        where = {}
        if shards is not None:
            where = dict(
                seg=shards.segment_ids(p.device), n=len(shards.shapes), process_group=self.process_group
            )
        adam_sphere_update(
            p,
            p.grad,
            self.state[p],
            lr=self._lr(group),
            coef=coef,
            betas=group["betas"],
            eps=group["eps"],
            **where,
        )

    @staticmethod
    def _lr(group: dict) -> float:
        if "lr" not in group:
            raise RuntimeError(
                f"group {group['name']} has no lr: a GroupLR (mupfast.optim.schedules) sets every group's lr"
            )
        return group["lr"]

    def _device(self, groups) -> torch.device:
        for g in groups:
            if g["params"]:
                return g["params"][0].device
        return torch.device("cpu")


def _by_betas_eps(groups: list[dict], ids: list[int]) -> list[tuple[tuple[float, float], float, list[int]]]:
    """The tensors (indices into ``ids``) of each distinct (betas, eps) among their groups."""
    split: dict[tuple, list[int]] = {}
    for i, gi in enumerate(ids):
        g = groups[gi]
        split.setdefault((tuple(g["betas"]), g["eps"]), []).append(i)
    return [(betas, eps, idx) for (betas, eps), idx in split.items()]


#: The group hyperparameters a config sets besides the lr (which GroupLR sets from optim.lr).
CONFIGURED_KEYS = ("betas", "eps", "weight_decay", "max_grad_norm")


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Each group's configured hyperparameters by group name (see :func:`apply_hyperparameters`)."""
    return {g["name"]: {k: g[k] for k in CONFIGURED_KEYS} for g in optimizer.param_groups}


def apply_hyperparameters(optimizer: torch.optim.Optimizer, values: dict[str, dict]) -> None:
    """Write group hyperparameters by group name into the optimizer's groups.

    A checkpoint load restores the saved ``param_groups``; the trainer applies the config's values
    after it, so a resumed run (a PBT member after explore) trains with the config it was given.
    """
    for g in optimizer.param_groups:
        if g.get("name") in values:
            g.update(values[g["name"]])


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


def build_optimizer(
    model: nn.Module, cfg: Config, *, world_size: int = 1, reduce_norms: bool = False, process_group=None
) -> ClipAdamW:
    """The clip+AdamW optimizer over the model's μP parameter groups (hyperp: Muon for its matrices).

    Its lrs come from ``optimizer.lr_schedule``, a :class:`~mupfast.optim.schedules.GroupLR` over the
    config's schedule with the base lr of :func:`~mupfast.optim.groups.base_lr` at ``world_size``
    ranks (hyperp's batch counts every rank's tokens): each group's lr is base · schedule(t) · lr_mult,
    set now for t = 0 and at each ``lr_schedule.step()``. The trainer hands that scheduler to DeepSpeed.
    """
    o = cfg.optim
    optimizer = ClipAdamW(
        build_param_groups(model, cfg),
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        global_max_norm=cfg.clip.global_max_norm,
        backend=o.backend,
        reduce_norms=reduce_norms,
        process_group=process_group,
        muon_momentum=o.muon_momentum,
        newton_schulz_backend=o.newton_schulz_backend,
    )
    optimizer.configured = configured_hyperparameters(optimizer)
    optimizer.lr_schedule = GroupLR(
        optimizer, base_lr(cfg, world_size), build_schedule(cfg.schedule, cfg.train.steps)
    )
    return optimizer
