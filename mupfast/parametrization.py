"""THE rules of every parametrization (SP, μP, CompleteP, HyperP): per parameter, its component, init,
learning-rate and weight-decay multipliers, forward multiplier and optimizer. Everything else reads
from here: the model its init and multipliers, the optimizer its groups, ``mupfast explain`` the table.

The table is not written out here: ``mupfast explain --config FILE`` prints it for any config, from
this code, and docs/mup.md ("The rules, derived") says why each row is what it is. Notation:
m = hidden_size / mup_base_hidden_size, m_f = filter_size / mup_base_filter_size, L = num_layers,
m_L = L / mup_base_num_layers. In short, under AdamW: a matrix whose fan-in and fan-out both grow
(q, k, v, o, ffn_in, ffn_out, the experts) gets init σ/√(its width multiplier) and lr × 1/m; an
output-like one (only the fan-in grows: the readout, the MoE router, k and v with fixed kv heads) a
constant init or σ/m with its forward or lr × 1/m; the embedding (only the fan-out grows) a constant
init and lr × 1. CompleteP adds depth; HyperP trains the hidden matrices by Muon on their init sphere
with one lr from its transfer rule (:func:`hyperp_transfer`).

Rules are matched against the model's real parameter names: a parameter claimed by no rule, or by
more than one, is an error that names it — μP that silently does not apply is the failure to avoid.
A submodule may state the rules of its own parameters (:class:`StatesOwnRules`: fine-tuning's adapters).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from mupfast.config import Config, ModelConfig
from mupfast.errors import ParametrizationError

#: Every component a rule can assign, in display order.
COMPONENTS = (
    "embedding",
    "pos_embedding",
    "q",
    "k",
    "v",
    "o",
    "ffn_in",
    "ffn_out",
    "router",
    "expert_in",
    "expert_out",
    "norm",
    "bias",
    "final_norm",
    "readout",
)

#: Components whose parameters live inside a transformer block (CompleteP scales their lr by depth).
BLOCK_COMPONENTS = frozenset(
    {"q", "k", "v", "o", "ffn_in", "ffn_out", "router", "expert_in", "expert_out", "norm", "bias"}
)


@dataclass(frozen=True)
class Rule:
    """How one parameter is initialised, optimised and used in the forward pass."""

    name: str
    shape: tuple[int, ...]
    component: str
    layer: int | None
    init: Literal["normal", "ones", "zeros"]
    init_std: float
    lr_mult: float
    wd_mult: float
    forward_mult: float
    optimizer: Literal["adamw", "muon_sphere", "adamw_sphere"] = "adamw"
    """adamw; muon_sphere: hyperp's hidden matrices (MuonH); adamw_sphere: hyperp's readout (AdamH)."""
    truncation: float = 0.0
    """A normal init is truncated at ± this many init_std (0: not truncated); init_std is the std
    parameter of the distribution, as torch's trunc_normal_ takes it."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Multipliers:
    """Width-dependent quantities that are not tied to a single parameter."""

    m: float
    m_f: float
    m_depth: float
    attention_scale: float
    logit_scale: float
    embedding_scale: float
    residual_scale: float
    router_scale: float = 1.0  # MoE router logits: 1/m under μP (an output-like layer), 1 otherwise
    m_kv: float = 1.0  # k and v's fan-out: kv_heads / mup_base_num_kv_heads (m when not given)


def multipliers(cfg: ModelConfig) -> Multipliers:
    """Width, depth and forward multipliers of a model config."""
    d_head = cfg.head_dim
    if cfg.parametrization == "sp":
        return Multipliers(1.0, 1.0, 1.0, 1.0 / math.sqrt(d_head), 1.0, 1.0, 1.0)
    m = cfg.hidden_size / (cfg.mup_base_hidden_size or cfg.hidden_size)
    m_f = cfg.filter_size / (cfg.mup_base_filter_size or cfg.filter_size)
    logit = cfg.output_logits_alpha / (m if cfg.scale_output_logits_by_d else math.sqrt(m))
    if cfg.parametrization == "hyperp":
        m_depth = cfg.num_layers / cfg.hyperp_base_depth
        residual = 1.0 / math.sqrt(2 * cfg.num_layers)
        return Multipliers(m, m_f, m_depth, 1.0 / math.sqrt(d_head), logit, cfg.embeddings_scale, residual)
    m_depth = cfg.num_layers / (cfg.mup_base_num_layers or cfg.num_layers)
    attn = cfg.attention_logits_alpha / (d_head if cfg.scale_qk_dot_by_d else math.sqrt(d_head))
    residual = m_depth**-cfg.depth_alpha if cfg.parametrization == "completep" else 1.0
    m_kv = cfg.kv_heads / cfg.mup_base_num_kv_heads if cfg.mup_base_num_kv_heads else m
    return Multipliers(m, m_f, m_depth, attn, logit, cfg.embeddings_scale, residual, 1.0 / m, m_kv)


# (regex on the parameter name, component). The first group of a block pattern is the layer index.
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"tok_emb\.weight", "embedding"),
    (r"pos_emb\.weight", "pos_embedding"),
    (r"blocks\.(\d+)\.attn\.q\.weight", "q"),
    (r"blocks\.(\d+)\.attn\.k\.weight", "k"),
    (r"blocks\.(\d+)\.attn\.v\.weight", "v"),
    (r"blocks\.(\d+)\.attn\.o\.weight", "o"),
    (r"blocks\.(\d+)\.mlp\.(gate|up)\.weight", "ffn_in"),
    (r"blocks\.(\d+)\.mlp\.down\.weight", "ffn_out"),
    (r"blocks\.(\d+)\.mlp\.router\.weight", "router"),
    (r"blocks\.(\d+)\.mlp\.(experts\.\d+|shared)\.(gate|up)\.weight", "expert_in"),
    (r"blocks\.(\d+)\.mlp\.(experts\.\d+|shared)\.down\.weight", "expert_out"),
    (r"blocks\.(\d+)\.mlp\.(experts\.\d+|shared)\.\w+\.bias", "bias"),
    (r"blocks\.(\d+)\.(attn_norm|mlp_norm)\.(weight|bias)", "norm"),
    (r"blocks\.(\d+)\.(attn|mlp)\.\w+\.bias", "bias"),
    (r"final_norm\.(weight|bias)", "final_norm"),
    (r"readout\.weight", "readout"),
)


#: Optimizers that keep each matrix on the Frobenius sphere of its init (mupfast/optim/sphere.py).
SPHERE_OPTIMIZERS = frozenset({"muon_sphere", "adamw_sphere"})

#: Components HyperP trains with Muon on the sphere.
MUON_COMPONENTS = frozenset({"q", "k", "v", "o", "ffn_in", "ffn_out", "router", "expert_in", "expert_out"})


def _hyperp_rule(
    cfg: ModelConfig, mult: Multipliers, name: str, shape: tuple[int, ...], component: str, layer: int | None
) -> Rule:
    wd = 0.0 if cfg.weight_decay_scaling == "none" else 1.0  # AdamW groups: wd as given (coupled)
    if component in MUON_COMPONENTS:
        fan_in = shape[-1]
        fwd = mult.residual_scale if component in ("o", "ffn_out", "expert_out") else 1.0
        std = 1.0 / math.sqrt(3 * fan_in)
        return Rule(name, shape, component, layer, "normal", std, 1.0, 0.0, fwd, "muon_sphere")
    if component in ("embedding", "pos_embedding"):
        default = 0.02 if cfg.tie_embeddings else 1e-4
        std = cfg.embedding_init_std if cfg.embedding_init_std is not None else default
        return Rule(name, shape, component, layer, "normal", std, 1.0, wd, mult.embedding_scale)
    if component in ("norm", "bias", "final_norm"):
        init = "ones" if component != "bias" and name.endswith("weight") else "zeros"
        return Rule(name, shape, component, layer, init, 0.0, 1.0, 0.0, 1.0)
    if component == "readout":
        std = cfg.output_init_std if cfg.output_init_std is not None else 0.02
        if cfg.hyperp_readout_sphere:  # zero init is refused with it (config.validate)
            # AdamH, as the anchor trains its untied lm_head: Adam's direction as a relative step on
            # the sphere. The sphere alone does not hold the logits across width (its radius grows
            # with d); the logits' α_out/m does (module docstring).
            return Rule(
                name, shape, component, layer, "normal", std, 1.0, 0.0, mult.logit_scale, "adamw_sphere"
            )
        std = 0.0 if cfg.readout_zero_init else std
        init = "zeros" if std == 0 else "normal"
        return Rule(name, shape, component, layer, init, std, 1.0, wd, mult.logit_scale)
    raise AssertionError(component)


def _rule(
    cfg: ModelConfig, mult: Multipliers, name: str, shape: tuple[int, ...], component: str, layer: int | None
) -> Rule:
    if cfg.parametrization == "hyperp":
        return _hyperp_rule(cfg, mult, name, shape, component, layer)
    sigma = cfg.init_std
    sigma_emb = cfg.embedding_init_std if cfg.embedding_init_std is not None else sigma
    sigma_out = cfg.output_init_std if cfg.output_init_std is not None else sigma
    sigma_ffn_in, sigma_o, sigma_ffn_out = (
        sigma if s is None else s for s in (cfg.ffn_in_init_std, cfg.o_init_std, cfg.ffn_out_init_std)
    )
    completep = cfg.parametrization == "completep"
    out_factor = 1.0 if completep else 1.0 / math.sqrt(2 * cfg.num_layers)
    depth_lr = mult.m_depth ** (cfg.depth_alpha - 1) if completep and component in BLOCK_COMPONENTS else 1.0
    # torch AdamW decays by lr·wd: "independent" keeps lr·wd width-invariant by wd × (1/lr_mult).
    wd_scaling = {"independent": None, "coupled": 1.0, "none": 0.0}[cfg.weight_decay_scaling]

    def hidden(width_mult: float, std: float) -> Rule:
        wd = width_mult if wd_scaling is None else wd_scaling
        return Rule(name, shape, component, layer, "normal", std, depth_lr / width_mult, wd, 1.0)

    if component in ("embedding", "pos_embedding"):
        # Tied: the logit multiplier is applied on the readout path, not to the shared weight.
        wd = 1.0 if wd_scaling is None else wd_scaling
        return Rule(name, shape, component, layer, "normal", sigma_emb, 1.0, wd, mult.embedding_scale)
    if component in ("k", "v") and mult.m_kv == 1 and mult.m != 1:
        # Fixed kv heads: fan-in grows, fan-out does not, so k and v are output-like (Tensor Programs
        # V): init std ∝ 1/fan_in, Adam lr ∝ 1/fan_in as for any matrix.
        return hidden(mult.m, sigma / mult.m)
    if component in ("q", "k", "v"):
        return hidden(mult.m, sigma / math.sqrt(mult.m))
    if component in ("ffn_in", "expert_in"):
        return hidden(mult.m, sigma_ffn_in / math.sqrt(mult.m))
    if component == "o":
        rule = hidden(mult.m, sigma_o / math.sqrt(mult.m) * out_factor)
        return Rule(**{**rule.to_dict(), "forward_mult": mult.residual_scale})
    if component == "ffn_out":
        rule = hidden(mult.m_f, sigma_ffn_out / math.sqrt(mult.m_f) * out_factor)
        return Rule(**{**rule.to_dict(), "forward_mult": mult.residual_scale})
    if component == "expert_out":  # width multiplier from the expert's own fan-in (module docstring)
        m_e = (
            1.0 if cfg.parametrization == "sp" else shape[-1] / (cfg.mup_base_filter_size or cfg.filter_size)
        )
        rule = hidden(m_e, sigma_ffn_out / math.sqrt(m_e) * out_factor)
        return Rule(**{**rule.to_dict(), "forward_mult": mult.residual_scale})
    if component == "router":  # output-like: constant init, lr × 1, logits × 1/m (module docstring)
        wd = 1.0 if wd_scaling is None else wd_scaling
        return Rule(name, shape, component, layer, "normal", sigma, depth_lr, wd, mult.router_scale)
    if component in ("norm", "bias", "final_norm"):
        init = "ones" if component != "bias" and name.endswith("weight") else "zeros"
        return Rule(name, shape, component, layer, init, 0.0, depth_lr, 0.0, 1.0)
    if component == "readout":
        wd = 1.0 if wd_scaling is None else wd_scaling
        std = 0.0 if cfg.readout_zero_init else sigma_out
        return Rule(
            name, shape, component, layer, "zeros" if std == 0 else "normal", std, 1.0, wd, mult.logit_scale
        )
    raise AssertionError(component)


@runtime_checkable
class StatesOwnRules(Protocol):
    """A submodule that states the rules of its own parameters (a fine-tuning adapter, whose rank does
    not grow with width), which the name patterns above do not know. ``prefix`` is its module path;
    it returns one rule per parameter it holds, named ``prefix.<parameter>``."""

    def mup_rules(self, prefix: str, cfg: ModelConfig) -> list[Rule]: ...


def _own_rule_modules(model: nn.Module) -> dict[str, StatesOwnRules]:
    """Module path → every outermost submodule of ``model`` that states its own rules."""
    out: dict[str, StatesOwnRules] = {}
    for path, module in model.named_modules():
        if path and isinstance(module, StatesOwnRules) and not any(path.startswith(f"{o}.") for o in out):
            out[path] = module
    return out


def _stated_rules(path: str, module: StatesOwnRules, cfg: ModelConfig) -> list[Rule]:
    """The rules a module states, checked to name each of its parameters once."""
    rules = module.mup_rules(path, cfg)
    names = [r.name for r in rules]
    expected = [f"{path}.{n}" for n, _ in module.named_parameters()]
    if sorted(names) != sorted(expected):
        raise ParametrizationError(
            f"{path}: its rules name {sorted(set(names) ^ set(expected))[:3]} differently from its parameters"
        )
    return rules


def rules_for(model: nn.Module, cfg: ModelConfig, *, own_rules: bool = True) -> list[Rule]:
    """Match every parameter of ``model`` to exactly one rule; raise naming any that isn't.

    The parameters of a submodule that states its own rules (:class:`StatesOwnRules`) follow the
    matched ones, as it states them; with ``own_rules`` false they are left out (the base model only)."""
    mult = multipliers(cfg)
    own = _own_rule_modules(model)
    prefixes = tuple(f"{path}." for path in own)
    rules = []
    for name, p in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            continue
        hits = [(m, comp) for pat, comp in _PATTERNS if (m := re.fullmatch(pat, name))]
        if not hits:
            raise ParametrizationError(
                f"parameter {name} {tuple(p.shape)} is claimed by no parametrization rule"
            )
        if len(hits) > 1:
            comps = ", ".join(c for _, c in hits)
            raise ParametrizationError(f"parameter {name} is claimed by several rules ({comps})")
        match, comp = hits[0]
        layer = int(match.group(1)) if name.startswith("blocks.") else None
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the real shape in ds_shape
        rule = _rule(cfg, mult, name, shape, comp, layer)
        if rule.init == "normal" and cfg.init_truncation:
            rule = replace(rule, truncation=cfg.init_truncation)
        rules.append(rule)
    if own_rules:
        for path, module in own.items():
            rules += _stated_rules(path, module, cfg)
    return rules


@torch.no_grad()
def init_parameters(model: nn.Module, rules: list[Rule], generator: torch.Generator | None = None) -> None:
    """Initialise every parameter exactly as its rule says."""
    params = dict(model.named_parameters())
    for r in rules:
        p = params[r.name]
        if r.init == "ones":
            p.fill_(1.0)
        elif r.init == "zeros" or r.init_std == 0:
            p.zero_()
        elif r.truncation:
            bound = r.truncation * r.init_std
            nn.init.trunc_normal_(p, 0.0, r.init_std, -bound, bound, generator=generator)
        else:
            p.normal_(0.0, r.init_std, generator=generator)


#: Raised whenever one config comes to train differently (a rule's meaning changed). Every run
#: records it in summary.json; the transfer-test run cache reuses only runs with the current one.
#: 2: hyperp logits × α_out/m (were × 1); hyperp readout on its sphere by default.
RULES_VERSION = 2

#: HyperP's token-horizon exponent: η ∝ (T/T0)^-0.32 (microsoft/ArchScale's HyperP).
HYPERP_TOKEN_EXPONENT = -0.32


def hyperp_transfer(cfg: Config, world_size: int = 1) -> dict[str, float]:
    """HyperP's lr transfer rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32 with its inputs.

    B = tokens per optimizer step (micro_batch_size · grad_accum_steps · world_size · seq_len),
    L = model.num_layers, T = train.steps · B; η0, B0, T0 from optim.hyperp_*, d0 from
    model.hyperp_base_depth.
    """
    t, o = cfg.train, cfg.optim
    batch = t.tokens_per_step(world_size)
    tokens = t.steps * batch
    d0, L = cfg.model.hyperp_base_depth, cfg.model.num_layers
    lr = (
        o.hyperp_base_lr
        * math.sqrt(batch / o.hyperp_base_batch_tokens)
        * math.sqrt(d0 / L)
        * (tokens / o.hyperp_base_tokens) ** HYPERP_TOKEN_EXPONENT
    )
    return {
        "lr": lr,
        "base_lr": o.hyperp_base_lr,
        "batch_tokens": batch,
        "base_batch_tokens": o.hyperp_base_batch_tokens,
        "num_layers": L,
        "base_depth": d0,
        "tokens": tokens,
        "base_tokens": o.hyperp_base_tokens,
        "token_exponent": HYPERP_TOKEN_EXPONENT,
        "world_size": world_size,
    }


def adamw_transfer(cfg: Config, world_size: int = 1) -> dict[str, Any]:
    """The AdamW parametrizations' rule across batch and horizon, with its inputs and factors.

    optim.lr and optim.weight_decay were tuned at B0 tokens per step over T0 training tokens
    (optim.base_batch_tokens, optim.base_tokens; 0: this run's own B and T). At this run's B and T:

        η = lr · (B/B0)^β · (T/T0)^-α
        λ = weight_decay · (lr/η) · (S0/S),   S = T/B = train.steps, S0 = T0/B0

    so AdamW's decay timescale 1/(η·λ) in steps stays the same fraction of the run (Wang & Aitchison,
    2024). Each group decays by its lr × λ × wd_mult: under weight_decay_scaling independent every
    group's timescale is 1/(η·λ); under coupled the hidden matrices' is m times that, as the
    convention wants, and the rule moves it by the same factor. At B = B0 and T = T0 both values are
    the configured ones exactly.
    """
    t, o = cfg.train, cfg.optim
    batch = t.tokens_per_step(world_size)
    tokens = t.steps * batch
    base_batch = o.base_batch_tokens or batch
    base_tokens = o.base_tokens or tokens
    batch_factor = (batch / base_batch) ** o.batch_lr_exponent
    tokens_factor = (tokens / base_tokens) ** -o.horizon_lr_exponent
    lr = o.lr * batch_factor * tokens_factor
    base_steps = base_tokens / base_batch
    wd_factor = (o.lr / lr) * (base_steps / t.steps)
    return {
        "lr": lr,
        "base_lr": o.lr,
        "weight_decay": o.weight_decay * wd_factor,
        "base_weight_decay": o.weight_decay,
        "batch_tokens": batch,
        "base_batch_tokens": base_batch,
        "tokens": tokens,
        "base_tokens": base_tokens,
        "steps": t.steps,
        "base_steps": base_steps,
        "batch_exponent": o.batch_lr_exponent,
        "horizon_exponent": o.horizon_lr_exponent,
        "factors": {
            "batch": batch_factor,
            "tokens": tokens_factor,
            "lr": batch_factor * tokens_factor,
            "weight_decay": wd_factor,
        },
        "active": bool(o.base_batch_tokens or o.base_tokens),
        "world_size": world_size,
    }


def hyperp_own_bases(cfg: Config, lr: float, *, steps: int | None = None, depth: int | None = None) -> dict:
    """Overrides that make ``cfg`` its own HyperP base, so the rule gives it η = η0 = ``lr``.

    B0 is its tokens per step, T0 its tokens over ``steps`` (default train.steps), d0 ``depth``
    (default its num_layers: a deeper model of a depth grid then gets η0·√(d0/L)). The grids of
    transfer-test, horizon-test and coord-check train their smallest model at the lr they name.
    """
    t = cfg.train
    batch = t.tokens_per_step()
    return {
        "optim.hyperp_base_lr": lr,
        "optim.hyperp_base_batch_tokens": batch,
        "optim.hyperp_base_tokens": float(batch * (steps if steps is not None else t.steps)),
        "model.hyperp_base_depth": depth if depth is not None else cfg.model.num_layers,
    }
