"""The rules table, shown: ``mupfast explain`` prints it for a config, as a table or JSON.

:func:`rules_table` builds the model a config describes (on the meta device: no memory, no init)
and matches its parameters against the rules of :mod:`mupfast.parametrization`; :func:`run_rules_table`
does so after the features' changes to the model (a fine-tune's frozen base and adapters).
:func:`format_table` and :func:`table_json` render them with the multipliers that belong to no
single parameter (the attention logits, the output logits, the residual branches) and, for hyperp,
its lr rule.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, replace

import torch

from mupfast.config import Config, ModelConfig, load_config
from mupfast.model import Transformer
from mupfast.parametrization import Rule, adamw_transfer, hyperp_transfer, multipliers, rules_for
from mupfast.plugins import prepare_model


def rules_table(cfg: ModelConfig) -> list[Rule]:
    """The rules of every parameter of the model ``cfg`` describes (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return rules_for(model, cfg)


def run_rules_table(cfg: Config) -> list[Rule]:
    """The rules of the model a whole run trains: the features' changes made (a fine-tune's frozen
    base and its adapters, on the meta device); a frozen parameter's row has lr and wd mult 0."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
        prepare_model(model, cfg, load_weights=False)
    params = dict(model.named_parameters())
    return [
        r if params[r.name].requires_grad else replace(r, lr_mult=0.0, wd_mult=0.0)
        for r in rules_for(model, cfg.model)
    ]


def _transfer_line(run: Config) -> str:
    h = hyperp_transfer(run)
    return (
        f"lr η = η0·√(B/B0)·√(d0/L)·(T/T0)^{h['token_exponent']:g} = {h['lr']:.6g}"
        f"   (η0={h['base_lr']:g}, B={h['batch_tokens']:g} tokens/step at world size 1, B0={h['base_batch_tokens']:g},"
        f" d0={h['base_depth']}, L={h['num_layers']}, T={h['tokens']:g}, T0={h['base_tokens']:g}); optim.lr unused"
    )


def adamw_rule_lines(h: dict) -> list[str]:
    """The AdamW rule across batch and horizon (:func:`~mupfast.parametrization.adamw_transfer`'s
    report) in two lines: the lr and the weight decay, with their inputs and factors."""
    f = h["factors"]
    return [
        f"lr η = lr·(B/B0)^β·(T/T0)^-α = {h['lr']:.6g}   (lr={h['base_lr']:g} tuned at B0={h['base_batch_tokens']:g}"
        f" tokens/step over T0={h['base_tokens']:g} tokens; B={h['batch_tokens']:g} at world size"
        f" {h['world_size']}, T={h['tokens']:g}: (B/B0)^{h['batch_exponent']:g} = {f['batch']:.4g},"
        f" (T/T0)^{-h['horizon_exponent']:g} = {f['tokens']:.4g})",
        f"weight decay λ = wd·(lr/η)·(S0/S) = {h['weight_decay']:.6g}   (wd={h['base_weight_decay']:g},"
        f" S0={h['base_steps']:g} steps, S={h['steps']} steps: × {f['weight_decay']:.4g}; AdamW's decay"
        " timescale 1/(η·λ) the same fraction of the run)",
    ]


def _index_set(indices: list[int]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
    return (
        f"[{indices[0]}-{indices[-1]}]"
        if contiguous and len(indices) > 2
        else f"[{','.join(map(str, indices))}]"
    )


def _table_rows(rules: list[Rule]) -> list[tuple[str, Rule]]:
    """(displayed name, rule) per row: the experts of a layer whose rules agree share one row
    (``blocks.0.mlp.experts.[0-7].gate.weight``), so a 64-expert model's table stays readable."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple[tuple | None, Rule]] = []
    for r in rules:
        match = re.fullmatch(r"(.*\.experts\.)(\d+)(\..*)", r.name)
        if match is None:
            order.append((None, r))
            continue
        key = (match[1], match[3], *(v for k, v in asdict(r).items() if k != "name"))
        if key not in groups:
            groups[key] = []
            order.append((key, r))
        groups[key].append(int(match[2]))
    return [(r.name if key is None else f"{key[0]}{_index_set(groups[key])}{key[1]}", r) for key, r in order]


def format_table(cfg: ModelConfig, rules: list[Rule], run: Config | None = None) -> str:
    """The rules as a human-readable table, followed by the global multipliers.

    With the whole run config (``run``), hyperp also shows its transfer rule and the η it gives.
    """
    mult = multipliers(cfg)
    rows = _table_rows(rules)
    w = max(34, *(len(name) for name, _ in rows))
    header = f"{'parameter':<{w}} {'component':<13} {'shape':<14} {'init std':>10} {'lr mult':>9} {'wd mult':>8} {'fwd mult':>9} {'optimizer':>11}"
    lines = [
        f"parametrization: {cfg.parametrization}   m = {mult.m:g}   m_f = {mult.m_f:g}   m_L = {mult.m_depth:g}"
        + (f"   m_kv = {mult.m_kv:g}" if mult.m_kv != mult.m and cfg.parametrization != "sp" else "")
        + f"   weight_decay_scaling: {cfg.weight_decay_scaling}"
        + (f"   normal inits truncated at ±{cfg.init_truncation:g} std" if cfg.init_truncation else ""),
        header,
        "-" * len(header),
    ]
    for name, r in rows:
        std = {"ones": "1", "zeros": "0"}.get(r.init, f"{r.init_std:.4g}")
        shape = "×".join(map(str, r.shape))
        lines.append(
            f"{name:<{w}} {r.component:<13} {shape:<14} {std:>10} {r.lr_mult:>9.4g} {r.wd_mult:>8.4g} {r.forward_mult:>9.4g} {r.optimizer:>11}"
        )
    lines += [
        "",
        f"attention logits × {mult.attention_scale:.6g}"
        + (
            ""
            if cfg.parametrization == "sp"
            else f"   (1/√d_head, d_head={cfg.head_dim}: the anchor's √128/d_head at its fixed d_head 128)"
            if cfg.parametrization == "hyperp"
            else f"   (α_attn={cfg.attention_logits_alpha:g} / "
            + (f"d_head={cfg.head_dim})" if cfg.scale_qk_dot_by_d else f"√d_head, d_head={cfg.head_dim})")
        ),
        f"output logits × {mult.logit_scale:.6g}   embeddings × {mult.embedding_scale:.6g}"
        f"   residual branches × {mult.residual_scale:.6g}",
    ]
    if cfg.parametrization == "hyperp":
        lines.append(
            _transfer_line(run)
            if run is not None
            else "lr η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32 from the run config (see `mupfast explain`)"
        )
    elif run is not None and (rule := adamw_transfer(run))["active"]:
        lines += adamw_rule_lines(rule)
    return "\n".join(lines)


def table_json(cfg: ModelConfig, rules: list[Rule], run: Config | None = None) -> dict:
    """The rules and global multipliers as a JSON-serialisable dict (hyperp: plus its transfer rule)."""
    out = {
        "parametrization": cfg.parametrization,
        "weight_decay_scaling": cfg.weight_decay_scaling,
        "multipliers": asdict(multipliers(cfg)),
        "rules": [r.to_dict() for r in rules],
    }
    if cfg.parametrization == "hyperp" and run is not None:
        out["transfer_rule"] = hyperp_transfer(run)
    elif run is not None and (rule := adamw_transfer(run))["active"]:
        out["transfer_rule"] = rule
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """The ``explain`` verb."""
    cfg = load_config(args.config, args.overrides)
    rules = run_rules_table(cfg)  # a fine-tune: frozen base rows (lr mult 0), then the adapters'
    if args.json:
        print(json.dumps(table_json(cfg.model, rules, cfg), indent=2))
    else:
        print(format_table(cfg.model, rules, cfg))
    return 0
