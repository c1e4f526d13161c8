"""Attaching adapters: which matrices get one, and the module tree with them in place.

:func:`attach_adapters` freezes a model and replaces each target matrix (the rules-table components
named in ``finetune.target_components``) by an :class:`~mupfast.finetune.lora.AdaptedLinear`
holding the method's adapter, initialised and given its forward multipliers from the adapter rules
(:mod:`mupfast.finetune.rules`). The trainer (through :mod:`~mupfast.finetune.attach`), ``load_run``
(a fine-tune's checkpoint) and ``explain`` all build the same tree with it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mupfast.config import Config
from mupfast.errors import ConfigError
from mupfast.finetune.lora import AdaptedLinear, Adapter, LoraAdapter, adapted_modules
from mupfast.finetune.rules import adapter_rules, base_rules, width_multipliers
from mupfast.parametrization import Rule


def _adapter(cfg: Config, fan_in: int, fan_out: int) -> Adapter:
    f = cfg.finetune
    if f.method == "lora":
        return LoraAdapter(fan_in, fan_out, f.rank, f.alpha, f.dropout)
    if f.method == "adalora":
        from mupfast.finetune.adalora import SVDAdapter

        return SVDAdapter(fan_in, fan_out, f.init_rank, f.alpha, f.dropout)
    if f.method == "adamole":
        from mupfast.finetune.adamole import MoleAdapter

        return MoleAdapter(fan_in, fan_out, f.rank, f.alpha, f.experts, f.max_threshold, f.dropout)
    raise AssertionError(f.method)


def target_paths(model: nn.Module, cfg: Config) -> dict[str, str]:
    """Module path → component of every matrix that gets an adapter, read off the rules table."""
    wanted = set(cfg.finetune.target_components)
    out = {}
    for r in base_rules(model, cfg):
        if r.component in wanted and r.name.endswith(".weight"):
            path = r.name[: -len(".weight")]
            if not isinstance(model.get_submodule(path), nn.Linear | AdaptedLinear):
                raise ConfigError(f"finetune.target_components: {path} ({r.component}) is not a linear layer")
            out[path] = r.component
    missing = wanted - set(out.values())
    if missing:
        raise ConfigError(
            f"finetune.target_components: this model has no {', '.join(sorted(missing))} matrices "
            "(an MoE model's FFN is its experts: target q, k, v, o)"
        )
    return out


@torch.no_grad()
def attach_adapters(model: nn.Module, cfg: Config, *, init: bool = True) -> dict[str, AdaptedLinear]:
    """Freeze ``model`` and wrap every target matrix with the method's adapter, in place.

    With ``init`` the adapter parameters are initialised from their rules (torch's global RNG);
    either way the adapters' forward multipliers are set from the rules, so the table is the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for path, component in target_paths(model, cfg).items():
        base = model.get_submodule(path)
        parent_path, _, leaf = path.rpartition(".")
        adapter = _adapter(cfg, base.in_features, base.out_features).to(base.weight.device)
        if hasattr(adapter, "m_out"):  # AdaLoRA's orthogonality is measured at the proxy's width
            adapter.m_out = width_multipliers(cfg, component)[1]
        setattr(model.get_submodule(parent_path), leaf, AdaptedLinear(base, adapter))
    params = dict(model.named_parameters())
    modules = adapted_modules(model)
    for r in adapter_rules(model, cfg):
        p = params[r.name]
        if init and r.init == "normal":
            p.normal_(0.0, r.init_std)
        elif init:
            p.zero_()
        path, _, pname = r.name.rpartition(".")
        modules[path.removesuffix(".adapter")].adapter.set_forward_mult(pname, r.forward_mult)
    return modules


def explain_rules(cfg: Config, base: list[Rule]) -> list[Rule]:
    """``mupfast explain`` of a fine-tuning config: the base rows with lr mult 0 (frozen) followed by
    the adapters' rows, computed on a meta-device model with the adapters attached."""
    import torch

    from mupfast.model import Transformer

    if cfg.finetune.method in ("none", "full"):
        return base
    with torch.device("meta"):
        model = Transformer(cfg.model)
        attach_adapters(model, cfg, init=False)
    frozen = [replace(r, lr_mult=0.0, wd_mult=0.0) for r in base]
    return frozen + adapter_rules(model, cfg)
