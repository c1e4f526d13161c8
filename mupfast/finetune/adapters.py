"""Attaching adapters: which matrices get one, and the module tree with them in place.

:func:`attach_adapters` freezes a model and replaces each target matrix (the rules-table components
named in ``finetune.target_components``) by an :class:`~mupfast.finetune.lora.AdaptedLinear`
holding the method's adapter, told where it sits (its matrix's component and layer: its μP rules
depend on them), then initialised and given its forward multipliers from those rules
(:mod:`mupfast.finetune.rules`). The trainer, ``load_run`` (a fine-tune's checkpoint) and ``explain``
all build the same tree with it, through the feature's ``prepare_model`` (:mod:`~mupfast.finetune.attach`).
"""

from __future__ import annotations

import torch
from torch import nn

from mupfast.config import Config
from mupfast.errors import ConfigError
from mupfast.finetune.lora import AdaptedLinear, Adapter, LoraAdapter, adapted_modules
from mupfast.finetune.rules import AdapterSite, width_multipliers
from mupfast.parametrization import rules_for


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


def target_paths(model: nn.Module, cfg: Config) -> dict[str, tuple[str, int | None]]:
    """Module path → (component, layer) of every matrix that gets an adapter, read off the rules table."""
    wanted = set(cfg.finetune.target_components)
    out = {}
    for r in rules_for(model, cfg.model, own_rules=False):  # the base model's rows
        if r.component in wanted and r.name.endswith(".weight"):
            path = r.name[: -len(".weight")]
            if not isinstance(model.get_submodule(path), nn.Linear | AdaptedLinear):
                raise ConfigError(f"finetune.target_components: {path} ({r.component}) is not a linear layer")
            out[path] = (r.component, r.layer)
    missing = wanted - {component for component, _ in out.values()}
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
    for path, (component, layer) in target_paths(model, cfg).items():
        base = model.get_submodule(path)
        parent_path, _, leaf = path.rpartition(".")
        adapter = _adapter(cfg, base.in_features, base.out_features).to(base.weight.device)
        adapter.site = AdapterSite(component, layer, cfg.finetune.lora_plus_ratio)
        if hasattr(adapter, "m_out"):  # AdaLoRA's orthogonality is measured at the proxy's width
            adapter.m_out = width_multipliers(cfg.model, component)[1]
        setattr(model.get_submodule(parent_path), leaf, AdaptedLinear(base, adapter))
    modules = adapted_modules(model)
    for path, module in modules.items():
        adapter = module.adapter
        for r in adapter.mup_rules(f"{path}.adapter", cfg.model):
            pname = r.name.rpartition(".")[2]
            p = adapter.get_parameter(pname)
            if init and r.init == "normal":
                p.normal_(0.0, r.init_std)
            elif init:
                p.zero_()
            adapter.set_forward_mult(pname, r.forward_mult)
    return modules
