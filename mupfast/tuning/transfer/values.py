"""What μTransfer carries from a proxy to a target config, and the values it gives them.

:func:`transfer_to` is the one place that decides it (``mupfast transfer``, ``transfer --pbt``
and ``transfer-compare`` all use it); docs/mutransfer.md says what is carried and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mupfast.config import Config, with_overrides
from mupfast.errors import ConfigError
from mupfast.tuning.space import space_key

MODEL_KEYS = (
    "init_std",
    "embeddings_scale",
    "output_logits_alpha",
    "attention_logits_alpha",
    "embedding_init_std",
    "output_init_std",
    "readout_zero_init",
    "scale_qk_dot_by_d",
    "scale_output_logits_by_d",
)
OPTIM_KEYS = ("lr", "beta1", "beta2", "eps")
HYPERP_OPTIM_KEYS = ("muon_momentum",)
SCHEDULE_KEYS = ("kind", "min_lr_ratio", "decay_fraction", "decay_shape", "cycle_peak_decay")
SCHEDULE_STEP_KEYS = ("warmup_steps", "cycle_steps")
NOT_TRANSFERRED = (
    "optim.weight_decay, model.weight_decay_scaling, clip.*, and the scale (width, depth, batch, steps, data)"
)


def hyperp_rebase(
    proxy: Config, target: Config, *, proxy_world_size: int = 1, target_world_size: int = 1
) -> dict[str, Any]:
    """HyperP's transfer from a (trial-valued) proxy to a target: the target's base values, both ηs.

    Returns ``values`` (the dotted keys the target gets), ``proxy`` and ``target`` (each
    :func:`~mupfast.parametrization.hyperp_transfer` of the run, the target's after rebasing) and
    ``factors``: √(B/B0), √(d0/L), (T/T0)^-0.32 and their product, the target over the proxy.
    """
    from mupfast.parametrization import HYPERP_TOKEN_EXPONENT, hyperp_transfer

    p = hyperp_transfer(proxy, proxy_world_size)
    values = {
        "optim.hyperp_base_lr": p["lr"],
        "optim.hyperp_base_batch_tokens": int(p["batch_tokens"]),
        "optim.hyperp_base_tokens": float(p["tokens"]),
        "model.hyperp_base_depth": int(p["num_layers"]),
    }
    t = hyperp_transfer(with_overrides(target, values, check=False), target_world_size)
    factors = {
        "batch": math.sqrt(t["batch_tokens"] / p["batch_tokens"]),
        "depth": math.sqrt(p["num_layers"] / t["num_layers"]),
        "tokens": (t["tokens"] / p["tokens"]) ** HYPERP_TOKEN_EXPONENT,
    }
    factors["total"] = factors["batch"] * factors["depth"] * factors["tokens"]
    return {"values": values, "proxy": p, "target": t, "factors": factors}


def adamw_rebase(
    proxy: Config,
    target: Config,
    *,
    proxy_world_size: int = 1,
    target_world_size: int = 1,
    exponents: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The AdamW rule across batch and horizon from a (trial-valued) proxy to a target.

    The target gets the lr the proxy trained with as optim.lr, the proxy's tokens per step and
    training tokens as optim.base_batch_tokens / base_tokens, and the exponents (``exponents``
    ``{"batch": β, "horizon": α}`` from fits, else the target config's own); its optim.weight_decay,
    its own, is then read as tuned at the proxy's scale. Returns ``values``, ``proxy`` and ``target``
    (:func:`~mupfast.parametrization.adamw_transfer` of each run, the target's after rebasing).
    """
    from mupfast.parametrization import adamw_transfer

    p = adamw_transfer(proxy, proxy_world_size)
    exponents = exponents or {}
    values = {
        "optim.lr": p["lr"],
        "optim.base_batch_tokens": int(p["batch_tokens"]),
        "optim.base_tokens": float(p["tokens"]),
        "optim.batch_lr_exponent": float(exponents.get("batch", target.optim.batch_lr_exponent)),
        "optim.horizon_lr_exponent": float(exponents.get("horizon", target.optim.horizon_lr_exponent)),
    }
    t = adamw_transfer(with_overrides(target, values, check=False), target_world_size)
    return {"values": values, "proxy": p, "target": t}


@dataclass
class Transfer:
    """What a target gets from a proxy: ``values`` (dotted config key → value) and the report of the
    rule that carried the lr to the target's batch and horizon (``kind``: hyperp or adamw; ``rule``:
    :func:`hyperp_rebase`'s or :func:`adamw_rebase`'s report)."""

    values: dict[str, Any]
    kind: str
    rule: dict[str, Any]

    def lines(self) -> list[str]:
        """The rule in a few lines: the proxy's lr and scale, the factors, the target's lr."""
        from mupfast.explain import adamw_rule_lines

        if self.kind == "hyperp":
            return hyperp_lines(self.rule)
        p = self.rule["proxy"]
        return [
            f"proxy: lr {p['lr']:.6g}, B={p['batch_tokens']:g} tokens/step at world size {p['world_size']},"
            f" T={p['tokens']:g} tokens ({p['steps']} steps); at the target:",
            *("  " + line for line in adamw_rule_lines(self.rule["target"])),
        ]


def transferred_values(proxy: Config, params: dict[str, float], target: Config, **kwargs) -> dict[str, Any]:
    """Dotted key → value for the target (:func:`transfer_to`'s values)."""
    return transfer_to(proxy, params, target, **kwargs).values


def transfer_to(
    proxy: Config,
    params: dict[str, float],
    target: Config,
    *,
    proxy_world_size: int = 1,
    target_world_size: int = 1,
    exponents: dict[str, float] | None = None,
) -> Transfer:
    """The target's values: the trial's values, the proxy's base dims and settings, and the lr (with
    its rule) carried to the target's batch and horizon (``exponents``: fitted β and α,
    {"batch": …, "horizon": …}, for the AdamW rule)."""
    pm, tm = proxy.model, target.model
    if (pm.parametrization == "hyperp") != (tm.parametrization == "hyperp"):
        raise ConfigError(
            f"--target: model.parametrization is {tm.parametrization} and the proxy's {pm.parametrization}; "
            "a hyperp lr (Muon on the sphere, η from its transfer rule) only transfers to hyperp"
        )
    if pm.parametrization == "sp":
        raise ConfigError("the proxy of this study is sp: μTransfer needs a mup or completep proxy")
    if tm.parametrization == "sp":
        raise ConfigError("--target: model.parametrization is sp; μTransfer needs mup, completep or hyperp")
    values: dict[str, Any] = {
        "model.mup_base_hidden_size": pm.mup_base_hidden_size or pm.hidden_size,
        "model.mup_base_filter_size": pm.mup_base_filter_size or pm.filter_size,
    }
    if pm.num_kv_heads is not None or tm.num_kv_heads is not None:  # GQA: whether k, v's fan-out grows
        values["model.mup_base_num_kv_heads"] = pm.mup_base_num_kv_heads or pm.kv_heads
    if tm.parametrization == "completep" and pm.parametrization == "completep":
        values["model.mup_base_num_layers"] = pm.mup_base_num_layers or pm.num_layers
        values["model.depth_alpha"] = pm.depth_alpha
    values.update({f"model.{k}": getattr(pm, k) for k in MODEL_KEYS})
    values.update({f"optim.{k}": getattr(proxy.optim, k) for k in OPTIM_KEYS})
    values.update({f"schedule.{k}": getattr(proxy.schedule, k) for k in SCHEDULE_KEYS})
    ratio = target.train.steps / proxy.train.steps
    for k in SCHEDULE_STEP_KEYS:
        values[f"schedule.{k}"] = round(getattr(proxy.schedule, k) * ratio)
    tuned = {space_key(name, proxy): float(value) for name, value in params.items()}
    hyperp = pm.parametrization == "hyperp"
    if hyperp:
        values.update({f"optim.{k}": getattr(proxy.optim, k) for k in HYPERP_OPTIM_KEYS})
    values.update(tuned)
    tuned_proxy = with_overrides(proxy, tuned, check=False)
    sizes = {"proxy_world_size": proxy_world_size, "target_world_size": target_world_size}
    if hyperp:
        rule = hyperp_rebase(tuned_proxy, target, **sizes)
    else:
        rule = adamw_rebase(tuned_proxy, target, **sizes, exponents=exponents)
    values.update(rule["values"])
    return Transfer(values, "hyperp" if hyperp else "adamw", rule)


def write_values(raw: dict[str, Any], values: dict[str, Any], target: Config) -> dict[str, Any]:
    """``raw`` (the target's YAML mapping) with the transferred dotted keys set; a key left at None
    where the target has None too is not written."""
    for key, value in values.items():
        section, name = key.split(".")
        if value is None and getattr(getattr(target, section), name) is None:
            continue  # both at the default: nothing to write
        raw.setdefault(section, {})[name] = value
    return raw


def hyperp_lines(h: dict[str, Any]) -> list[str]:
    """HyperP's transfer in three lines: proxy η, the factors, target η."""
    p, t, f = h["proxy"], h["target"], h["factors"]
    return [
        f"HyperP rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^{t['token_exponent']:g}, rebased on the proxy"
        f" (B0={t['base_batch_tokens']:g}, d0={t['base_depth']}, T0={t['base_tokens']:g}):",
        f"  proxy  η = {p['lr']:.6g}  (η0={p['base_lr']:.6g} at B={p['batch_tokens']:g}, L={p['num_layers']},"
        f" T={p['tokens']:g}, world size {p['world_size']})",
        f"  target η = {t['lr']:.6g} = proxy η × √(B/B0) {f['batch']:.4g} × √(d0/L) {f['depth']:.4g}"
        f" × (T/T0)^-0.32 {f['tokens']:.4g} = × {f['total']:.4g}"
        f"  (B={t['batch_tokens']:g}, L={t['num_layers']}, T={t['tokens']:g}, world size {t['world_size']})",
    ]


def wrap_items(items: list[str], width: int = 96) -> list[str]:
    lines, line = [], "#  "
    for item in items:
        if len(line) + len(item) + 1 > width and line.strip("# "):
            lines.append(line.rstrip())
            line = "#  "
        line += " " + item
    return [*lines, line.rstrip()]


def short_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
