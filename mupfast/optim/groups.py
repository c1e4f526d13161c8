"""The optimizer's parameter groups, read from the rules table, and the base lr their multipliers scale.

One group per component (or per layer × component), of the parameters that train (frozen ones,
such as a fine-tune's base, are in none). Each group carries ``name``, ``component``,
``lr_mult``, ``wd_mult``, ``optimizer`` (adamw, or hyperp's sphere optimizers) and
``max_grad_norm``; its ``weight_decay`` is :func:`base_weight_decay` × wd_mult. A group's ``lr`` is not
written here: :class:`~mupfast.optim.schedules.GroupLR` alone sets it, to ``base_lr · schedule(t) · lr_mult``.
"""

from __future__ import annotations

from torch import nn

from mupfast.config import Config
from mupfast.errors import ConfigError
from mupfast.parametrization import COMPONENTS, adamw_transfer, hyperp_transfer, rules_for


def base_lr(cfg: Config, world_size: int = 1) -> float:
    """The lr every group's ``lr_mult`` multiplies: under hyperp its transfer-rule η, otherwise optim.lr
    carried to this run's batch and horizon (:func:`~mupfast.parametrization.adamw_transfer`; optim.lr
    itself when no base values are set)."""
    if cfg.model.parametrization == "hyperp":
        return hyperp_transfer(cfg, world_size)["lr"]
    return adamw_transfer(cfg, world_size)["lr"]


def base_weight_decay(cfg: Config, world_size: int = 1) -> float:
    """The weight decay every group's ``wd_mult`` multiplies: optim.weight_decay, under the AdamW
    parametrizations carried to this run's batch and horizon by the timescale rule."""
    if cfg.model.parametrization == "hyperp":
        return cfg.optim.weight_decay
    return adamw_transfer(cfg, world_size)["weight_decay"]


def build_param_groups(model: nn.Module, cfg: Config, world_size: int = 1) -> list[dict]:
    """Group parameters by component (or layer × component) with their multipliers and clip norm."""
    clip = cfg.clip
    weight_decay = base_weight_decay(cfg, world_size)
    unknown = set(clip.component_max_norm) - set(COMPONENTS)
    if unknown:
        raise ConfigError(
            f"clip.component_max_norm: unknown component(s) {sorted(unknown)}; valid: {', '.join(COMPONENTS)}"
        )
    params = dict(model.named_parameters())
    groups: dict[str, dict] = {}
    # The rules table (modules that state their own rules, such as adapters, included); a frozen
    # parameter is in no group.
    for r in (r for r in rules_for(model, cfg.model) if params[r.name].requires_grad):
        key = r.component
        if clip.granularity == "layer_component" and r.layer is not None:
            key = f"layer{r.layer}.{r.component}"
        g = groups.setdefault(
            key,
            {
                "name": key,
                "component": r.component,
                "params": [],
                "lr_mult": r.lr_mult,
                "wd_mult": r.wd_mult,
                "optimizer": r.optimizer,
                "max_grad_norm": clip.component_max_norm.get(r.component, clip.max_norm),
                "weight_decay": weight_decay * r.wd_mult,
            },
        )
        if (g["lr_mult"], g["wd_mult"], g["optimizer"]) != (r.lr_mult, r.wd_mult, r.optimizer):
            raise AssertionError(
                f"group {key}: {r.name} has different multipliers from the rest of its group"
            )
        g["params"].append(params[r.name])
    # DeepSpeed silently drops empty groups, which would desynchronise the scheduler: never create them.
    return [g for g in groups.values() if g["params"]]
