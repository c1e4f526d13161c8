"""ClipAdamW, the optimizer DeepSpeed is given, and :func:`build_optimizer`.

Each step computes every group's gradient norm and clip coefficient on the device (under ZeRO 1–3,
where each rank holds a partition of every group, the squared norms of all groups are all-reduced in
one collective first), then hands each group's parameters to its update kind
(``group["optimizer"]``: AdamW, MuonH or AdamH, in ``mupfast.optim.updates``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mupfast.config import Config
from mupfast.kernels import clip_adamw as fused
from mupfast.optim.groups import base_lr, build_param_groups
from mupfast.optim.muon import MOMENTUM_KEY
from mupfast.optim.schedules import GroupLR, build_schedule
from mupfast.optim.updates import AdamWSphereUpdate, AdamWUpdate, MuonSphereUpdate, StepInputs, Update
from mupfast.parametrization import SPHERE_OPTIMIZERS


class ClipAdamW(torch.optim.Optimizer):
    """Per-group gradient-norm clipping, fused into each group's update (AdamW unless the group's
    ``optimizer`` says ``muon_sphere`` or ``adamw_sphere``).

    ``reduce_norms`` all-reduces the per-group squared norms over ``process_group`` (ZeRO ≥ 1, where
    each rank holds a partition of every group); leave it off when gradients are replicated.
    ``backend`` (auto | torch | triton) runs the norms and AdamW; ``newton_schulz_backend`` is how Muon
    groups orthogonalise (mupfast.optim.muon). After each step ``last_grad_norms`` and
    ``last_clip_coefs`` hold the pre-clip norm and the coefficient of every group (device tensors,
    keyed by group name).

    Every group's ``lr`` is set by a :class:`~mupfast.optim.schedules.GroupLR` (``build_optimizer``
    attaches one); the optimizer has no lr of its own, and a group without one is an error.
    The other group hyperparameters (``betas``, ``eps``, ``weight_decay``, ``max_grad_norm``) are read
    from ``param_groups`` at every step, per group, as in torch's optimizers: a change made between
    steps (PBT's explore) applies to the very next update. ``configured`` keeps the values the
    optimizer was built with; :meth:`load_state_dict` puts them back over a checkpoint's.
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
        #: The update of each kind of group, by ``group["optimizer"]``.
        self.updates: dict[str, Update] = {
            "adamw": AdamWUpdate(backend),
            "muon_sphere": MuonSphereUpdate(muon_momentum, newton_schulz_backend),
            "adamw_sphere": AdamWSphereUpdate(),
        }
        self.configured = configured_hyperparameters(self)
        self.global_max_norm = global_max_norm
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

    # The update kinds' settings, read-only: they are fixed when the optimizer is built.
    backend = property(lambda self: self.updates["adamw"].backend)
    muon_momentum = property(lambda self: self.updates["muon_sphere"].momentum)
    newton_schulz_backend = property(lambda self: self.updates["muon_sphere"].ns_backend)

    def kernels(self, device: torch.device) -> tuple[Callable, Callable]:
        """(per-group squared norms, clipped AdamW update) for ``device``: Triton on CUDA, else torch."""
        return self.updates["adamw"].kernels(device)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        if self.skip_step is True:
            return loss
        groups = self.param_groups
        items = self._with_grads(groups)
        device = items[0][0].grad.device if items else self._device(groups)
        # Host values reach the device through pinned memory: a blocking copy would sync the stream.
        slots = fused.host_to_device([self._slot[g["name"]] for g in groups], torch.long, device)
        sq_all, logged = self._squared_norms(items, groups, slots, device)
        for g in groups:
            self._max_norms[self._slot[g["name"]]] = g["max_grad_norm"]
        max_norms = fused.host_to_device(self._max_norms, torch.float32, device)
        coef_all = fused.clip_coefficients(sq_all, max_norms, self.global_max_norm)
        skip = self.skip_step if isinstance(self.skip_step, torch.Tensor) else None
        inputs = StepInputs(groups, coef_all[slots], skip, device, self.shards, self.process_group)
        for kind, (params, ids) in _by_kind(items, groups).items():
            self.updates[kind](params, ids, self.state, inputs)
        norms = sq_all.sqrt()
        for name in logged:
            self.last_grad_norms[name] = norms[self._slot[name]]
            self.last_clip_coefs[name] = coef_all[self._slot[name]]
        return loss

    def _with_grads(self, groups: list[dict]) -> list[tuple[torch.Tensor, int]]:
        """(parameter, group index) of every parameter with a gradient, in group order."""
        items = []
        for gi, group in enumerate(groups):
            kind = group["optimizer"]
            if kind not in self.updates:
                raise ValueError(
                    f"group {group['name']}: unknown optimizer {kind!r} (known: {', '.join(self.updates)})"
                )
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if kind in SPHERE_OPTIMIZERS and p.ndim != 2 and id(p) not in self.shards:
                    raise ValueError(
                        f"group {group['name']}: {kind} needs whole matrices, got {tuple(p.shape)}"
                    )
                items.append((p, gi))
        return items

    def _squared_norms(
        self, items: list[tuple[torch.Tensor, int]], groups: list[dict], slots: torch.Tensor, device
    ) -> tuple[torch.Tensor, list[str]]:
        """Every group's squared gradient norm by slot, and the names of the groups measured.

        Every group keeps its slot (zero norm when it has no gradient here), so the norm vector has the
        same length on every rank and the all-reduce lines up."""
        if self.pending_sq_norms is not None:  # ZeRO: all groups' norms, reduced in one collective
            return self.pending_sq_norms.to(device), list(self._slot)
        sq_norms_fn = self.kernels(device)[0]
        sq = sq_norms_fn([p.grad for p, _ in items], [gi for _, gi in items], len(groups), device=device)
        if self.reduce_norms and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq, group=self.process_group)
        if len(groups) < len(self._slot) and self.global_max_norm > 0:
            raise RuntimeError(
                "clip.global_max_norm needs every group's norm in one step (not under ZeRO offload)"
            )
        sq_all = torch.zeros(len(self._slot), dtype=torch.float32, device=device).index_copy_(0, slots, sq)
        return sq_all, [g["name"] for g in groups if g["params"]]

    def state_dict(self) -> dict:
        """torch's state dict, each Muon state with a zero ``exp_avg_sq`` beside its momentum
        (``exp_avg``): DeepSpeed's universal converter reads both of Adam's moments from every group.
        The zero is one element expanded (stride 0): nothing in memory or in the checkpoint file."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if group["optimizer"] != "muon_sphere":
                continue
            for i in group["params"]:
                st = sd["state"].get(i)
                if st and MOMENTUM_KEY in st:  # a copy: sd["state"] holds the live state's dicts
                    m = st[MOMENTUM_KEY]
                    sd["state"][i] = {**st, "exp_avg_sq": m.new_zeros(()).expand(m.shape)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load (the saved state and groups), then the configured hyperparameters over the
        saved ones, so a resumed run (a PBT member after explore) trains with the config it was given.
        The lrs are the GroupLR's to recompute (``lr_schedule.load_state_dict``)."""
        super().load_state_dict(state_dict)
        self.tidy_muon_state()
        apply_hyperparameters(self, self.configured)

    def tidy_muon_state(self, partitions: list[tuple[int, torch.Tensor]] | None = None) -> None:
        """Each Muon state as its update keeps it, whatever loaded it: the momentum under ``exp_avg``
        (checkpoints written before kept it as ``momentum_buffer``), without the zero ``exp_avg_sq``
        (:meth:`state_dict`) or the step that DeepSpeed's universal loaders give every parameter.

        ``partitions``: (group index, parameter) pairs, for when the groups list no parameters (ZeRO-3
        fills them only for its step; ``mupfast.distributed.zero_shards.group_partitions``)."""
        if partitions is None:
            partitions = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        for gi, p in partitions:
            st = self.state.get(p)
            if self.param_groups[gi]["optimizer"] == "muon_sphere" and st:
                if "momentum_buffer" in st:
                    st[MOMENTUM_KEY] = st.pop("momentum_buffer")
                st.pop("exp_avg_sq", None)
                st.pop("step", None)

    def _device(self, groups) -> torch.device:
        for g in groups:
            if g["params"]:
                return g["params"][0].device
        return torch.device("cpu")


def _by_kind(
    items: list[tuple[torch.Tensor, int]], groups: list[dict]
) -> dict[str, tuple[list[torch.Tensor], list[int]]]:
    """(parameters, group indices) of each update kind, AdamW first, in group order within a kind."""
    split: dict[str, tuple[list, list]] = {"adamw": ([], [])}
    for p, gi in items:
        params, ids = split.setdefault(groups[gi]["optimizer"], ([], []))
        params.append(p)
        ids.append(gi)
    return {kind: lists for kind, lists in split.items() if lists[0]}


#: The group hyperparameters a config sets besides the lr (which GroupLR sets from optim.lr).
CONFIGURED_KEYS = ("betas", "eps", "weight_decay", "max_grad_norm")


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Each group's configured hyperparameters by group name (see :func:`apply_hyperparameters`)."""
    return {g["name"]: {k: g[k] for k in CONFIGURED_KEYS} for g in optimizer.param_groups}


def apply_hyperparameters(optimizer: torch.optim.Optimizer, values: dict[str, dict]) -> None:
    """Write group hyperparameters by group name into the optimizer's groups.

    :meth:`ClipAdamW.load_state_dict` writes back ``configured`` this way after every load, so a
    call after a checkpoint load (the trainer's) finds the values already in place.
    """
    for g in optimizer.param_groups:
        if g.get("name") in values:
            g.update(values[g["name"]])


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
        build_param_groups(model, cfg, world_size),
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
    optimizer.lr_schedule = GroupLR(
        optimizer, base_lr(cfg, world_size), build_schedule(cfg.schedule, cfg.train.steps)
    )
    return optimizer
