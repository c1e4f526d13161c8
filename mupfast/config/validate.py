"""Cross-field checks of a run config: what each key's type alone cannot say.

``validate(cfg)`` raises :class:`~mupfast.config.ConfigError` naming the key and the problem, which the
CLI prints as one ``error: …`` line; ``load_config`` calls it on every config it builds. A feature's
section is checked by the feature (``Feature.check``, :mod:`mupfast.plugins`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mupfast.errors import ConfigError
from mupfast.plugins import check_feature_sections

if TYPE_CHECKING:
    from mupfast.config.schema import Config


def _require_positive(pairs: list[tuple[str, object]], *, optional: bool = False) -> None:
    """Each (key, value) must be > 0 (NaN is not); with ``optional``, None is allowed too."""
    for key, value in pairs:
        if optional and value is None:
            continue
        if not value > 0:
            raise ConfigError(f"{key}: must be positive (got {value})")


#: DeepSpeed keys a ds_config file may not set: they come from our config, or belong to our optimizer.
_OWNED_KEYS = {
    "optimizer": "the optimizer is ours (optim.*)",
    "scheduler": "the lr schedule is ours (schedule.*)",
    "gradient_clipping": "clipping is per component, in our optimizer (clip.*)",
    "train_batch_size": "set train.micro_batch_size and train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "set train.micro_batch_size",
    "gradient_accumulation_steps": "set train.grad_accum_steps",
    "bf16": "set train.precision",
    "fp16": "set train.precision (fp16 is not supported; use bf16)",
}


def read_ds_overrides(path: str | Path) -> dict:
    """Read a DeepSpeed JSON to merge over ours; keys we own are errors naming where to set them."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"zero.ds_config: file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"zero.ds_config: {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"zero.ds_config: {path} must hold a JSON object")
    for key, why in _OWNED_KEYS.items():
        if key in raw:
            raise ConfigError(f"zero.ds_config: {path} sets {key!r}, which mupfast owns: {why}")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def validate(cfg: Config) -> None:
    """Cross-field checks, one section at a time; each failure names the key and the problem."""
    _check_model(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _check_data(cfg)
    _check_zero(cfg)
    _check_clip(cfg)
    _check_schedule(cfg)
    check_feature_sections(cfg)  # each feature's own section (finetune.*), by the feature


def _check_model(cfg: Config) -> None:
    """model.*: sizes, heads, RoPE, CompleteP, MoE (with zero.stage), the vocab (with data.*) and hyperp."""
    m = cfg.model
    _require_positive(
        [
            ("model.vocab_size", m.vocab_size),
            ("model.hidden_size", m.hidden_size),
            ("model.num_layers", m.num_layers),
            ("model.num_heads", m.num_heads),
            ("model.filter_size", m.filter_size),
            ("model.max_seq_len", m.max_seq_len),
        ]
    )
    _require_positive(
        [
            ("model.num_kv_heads", m.num_kv_heads),
            ("model.mup_base_hidden_size", m.mup_base_hidden_size),
            ("model.mup_base_filter_size", m.mup_base_filter_size),
            ("model.mup_base_num_kv_heads", m.mup_base_num_kv_heads),
            ("model.mup_base_num_layers", m.mup_base_num_layers),
        ],
        optional=True,
    )
    _check_mup_bases(m)
    _require_positive(
        [
            ("model.ffn_in_init_std", m.ffn_in_init_std),
            ("model.o_init_std", m.o_init_std),
            ("model.ffn_out_init_std", m.ffn_out_init_std),
        ],
        optional=True,
    )
    if not m.init_truncation >= 0:
        raise ConfigError(
            f"model.init_truncation: must be 0 (no truncation) or positive (got {m.init_truncation})"
        )
    _require_positive(
        [
            ("model.init_std", m.init_std),
            ("model.norm_eps", m.norm_eps),
            ("model.attention_logits_alpha", m.attention_logits_alpha),
        ]
    )
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads ({m.num_heads})"
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_heads: {m.num_heads} is not a multiple of model.num_kv_heads ({m.kv_heads})"
        )
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.position: rope needs an even head dim (got {m.head_dim})")
    if m.depth_alpha not in (0.5, 1.0):
        raise ConfigError(f"model.depth_alpha: must be 0.5 or 1 (got {m.depth_alpha})")
    if m.moe_experts < 0:
        raise ConfigError(f"model.moe_experts: must be non-negative, 0 for dense (got {m.moe_experts})")
    if m.moe_experts:
        _check_moe(cfg)
    if cfg.data.tokenizer == "byte" and m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size: the byte tokenizer needs at least 256 (got {m.vocab_size})")
    if cfg.data.tokenizer == "bpe" and m.vocab_size < cfg.data.bpe_vocab_size:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is smaller than data.bpe_vocab_size ({cfg.data.bpe_vocab_size})"
        )
    if m.parametrization == "hyperp":
        if m.readout_zero_init and not m.tie_embeddings and m.hyperp_readout_sphere:
            raise ConfigError(
                "model.readout_zero_init: not with hyperp's readout sphere (set model.hyperp_readout_sphere=false)"
            )
        _require_positive([("model.hyperp_base_depth", m.hyperp_base_depth)])


def _check_moe(cfg: Config) -> None:
    """model.moe_*: the expert keys when model.moe_experts > 0, grouped dispatch against zero.stage."""
    m = cfg.model
    if not 1 <= m.moe_top_k <= m.moe_experts:
        raise ConfigError(f"model.moe_top_k: must be in [1, moe_experts={m.moe_experts}] (got {m.moe_top_k})")
    if m.moe_granularity < 1 or m.filter_size % m.moe_granularity:
        raise ConfigError(
            f"model.moe_granularity: must divide model.filter_size ({m.filter_size}) (got {m.moe_granularity})"
        )
    if not 0 <= m.moe_shared_p <= 1:
        raise ConfigError(f"model.moe_shared_p: must be in [0, 1] (got {m.moe_shared_p})")
    for key, value in [
        ("model.moe_aux_loss_coef", m.moe_aux_loss_coef),
        ("model.moe_router_z_coef", m.moe_router_z_coef),
    ]:
        if value < 0:
            raise ConfigError(f"{key}: must be non-negative, 0 disables (got {value})")
    if not 1 <= m.moe_every <= m.num_layers:
        raise ConfigError(f"model.moe_every: must be in [1, num_layers={m.num_layers}] (got {m.moe_every})")
    if m.moe_dispatch == "grouped" and cfg.zero.stage == 3:
        # ZeRO-3 gathers a module's weights when its own forward runs; grouped reads the experts'
        # weights without calling them, so it would see their empty partitions.
        raise ConfigError("model.moe_dispatch: grouped does not run under zero.stage 3 (use loop)")
    expert_hidden = m.filter_size // m.moe_granularity
    if m.moe_dispatch == "grouped" and (m.hidden_size % 8 or expert_hidden % 8):
        raise ConfigError(
            "model.moe_dispatch: grouped needs hidden_size and the expert hidden size "
            f"(filter_size / moe_granularity) to be multiples of 8 (got {m.hidden_size}, {expert_hidden})"
        )


def _check_mup_bases(m) -> None:
    """The proxy dimensions μP cannot guess: its MLP width once its width is given, and its kv heads
    when the model uses grouped-query attention at another width (fixed or growing kv heads need
    different rules for k and v)."""
    if m.parametrization not in ("mup", "completep"):
        return
    if m.mup_base_hidden_size is None and m.mup_base_filter_size is not None:
        # Cerebras raises here too: m would silently be 1 while m_f is not.
        raise ConfigError(
            "model.mup_base_hidden_size: must be set with model.mup_base_filter_size (the proxy's "
            "hidden_size); without it every hidden matrix keeps m = 1 while the FFN output scales with m_f"
        )
    if m.mup_base_hidden_size is None:
        return
    if m.mup_base_filter_size is None:
        raise ConfigError(
            "model.mup_base_filter_size: must be set with model.mup_base_hidden_size (the proxy's "
            f"filter_size, e.g. {m.mup_base_hidden_size * m.filter_size / m.hidden_size:g} if it keeps "
            "this model's filter/hidden ratio); without it the FFN output keeps SP's init and lr as "
            "filter_size grows"
        )
    gqa = m.num_kv_heads is not None and m.num_kv_heads != m.num_heads
    if gqa and m.mup_base_num_kv_heads is None and m.hidden_size != m.mup_base_hidden_size:
        raise ConfigError(
            "model.mup_base_num_kv_heads: must be set with model.num_kv_heads at another width than the "
            f"proxy's (the proxy's num_kv_heads: {m.num_kv_heads} if the kv heads stay fixed as the "
            "width grows, fewer if they grow with it)"
        )
    if m.mup_base_num_kv_heads is not None and m.mup_base_num_kv_heads > m.kv_heads:
        raise ConfigError(
            f"model.mup_base_num_kv_heads: {m.mup_base_num_kv_heads} is more than this model's "
            f"{m.kv_heads} kv heads (μP transfers from a narrower proxy)"
        )


def _check_train(cfg: Config) -> None:
    """train.*: positive sizes and timeout, and train.seq_len within model.max_seq_len."""
    t = cfg.train
    _require_positive(
        [
            ("train.steps", t.steps),
            ("train.seq_len", t.seq_len),
            ("train.micro_batch_size", t.micro_batch_size),
            ("train.grad_accum_steps", t.grad_accum_steps),
            ("train.dist_timeout_s", t.dist_timeout_s),
            ("train.checkpoint_every", t.checkpoint_every),
        ]
    )
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    if not 0 <= t.stop_at <= t.steps:
        raise ConfigError(
            f"train.stop_at: must be in [0, train.steps = {t.steps}] (got {t.stop_at}; 0 means train.steps)"
        )


def _check_optim(cfg: Config) -> None:
    """optim.*: AdamW's lr, eps, betas and weight decay; under model.parametrization=hyperp, its keys."""
    o = cfg.optim
    _require_positive([("optim.lr", o.lr), ("optim.eps", o.eps)])
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]:
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1) (got {value})")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay: must be non-negative (got {o.weight_decay})")
    _check_batch_horizon_rule(cfg)
    if cfg.model.parametrization == "hyperp":
        _require_positive(
            [
                ("optim.hyperp_base_lr", o.hyperp_base_lr),
                ("optim.hyperp_base_batch_tokens", o.hyperp_base_batch_tokens),
                ("optim.hyperp_base_tokens", o.hyperp_base_tokens),
            ]
        )
        if not 0 <= o.muon_momentum < 1:
            raise ConfigError(f"optim.muon_momentum: must be in [0, 1) (got {o.muon_momentum})")
        if o.newton_schulz_backend == "triton":
            from importlib.util import find_spec  # only this choice needs it

            if find_spec("triton") is None:
                raise ConfigError("optim.newton_schulz_backend: triton is not installed (use auto or torch)")


def _check_batch_horizon_rule(cfg: Config) -> None:
    """optim.base_batch_tokens, base_tokens and their exponents (the AdamW rule across batch and horizon)."""
    o = cfg.optim
    for key, value in [
        ("optim.base_batch_tokens", o.base_batch_tokens),
        ("optim.base_tokens", o.base_tokens),
    ]:
        if not 0 <= value < float("inf"):
            raise ConfigError(f"{key}: must be non-negative, 0 for this run's own (got {value})")
    for key, value in [
        ("optim.batch_lr_exponent", o.batch_lr_exponent),
        ("optim.horizon_lr_exponent", o.horizon_lr_exponent),
    ]:
        if not -2 <= value <= 2:
            raise ConfigError(f"{key}: must be a finite exponent in [-2, 2] (got {value})")
    if cfg.model.parametrization == "hyperp" and (o.base_batch_tokens or o.base_tokens):
        raise ConfigError(
            "optim.base_batch_tokens: hyperp has its own batch and horizon rule; set "
            "optim.hyperp_base_batch_tokens and optim.hyperp_base_tokens instead"
        )


def _check_data(cfg: Config) -> None:
    """data.*: the validation share, sizes, data.prepared, and the mixture's sources.

    The corpus and tokenizer paths are checked when the data is prepared (a config whose corpus
    is not on this machine must still load, e.g. for ``mupfast explain``)."""
    d = cfg.data
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be between 0 and 1 (got {d.val_fraction})")
    if d.prepared and not Path(d.prepared).is_dir():
        raise ConfigError(f"data.prepared: directory does not exist: {d.prepared}")
    if not d.corpus:
        raise ConfigError("data.corpus: empty (give a path, a glob, a list of them, or stdlib)")
    if not d.text_field:
        raise ConfigError("data.text_field: empty (the JSON Lines / Parquet field of the text)")
    if not d.tokenizer:
        raise ConfigError("data.tokenizer: empty (byte, bpe, or the path of a tokenizer.json)")
    if d.eos_token is not None and not d.eos_token:
        raise ConfigError("data.eos_token: empty (leave it out to use the tokenizer's own)")
    _require_positive([("data.shard_tokens", d.shard_tokens)])
    if d.workers < 0 or d.max_corpus_bytes < 0:
        raise ConfigError(
            "data.workers: workers and max_corpus_bytes must be non-negative (0: all cores, no cap)"
        )
    if d.sources:
        if d.prepared:
            raise ConfigError("data.sources: a mixture names each source's data; leave data.prepared empty")
        if d.tokenizer == "bpe":
            raise ConfigError(
                "data.sources: a mixture needs one tokenizer for every source; train the BPE with "
                "`mupfast prepare-data` on one corpus and set data.tokenizer to its tokenizer.json"
            )
        for i, s in enumerate(d.sources):
            if not (s.weight > 0 and s.weight < float("inf")):
                raise ConfigError(f"data.sources[{i}].weight: must be a positive number (got {s.weight})")
            if not s.corpus and not s.prepared:
                raise ConfigError(f"data.sources[{i}]: give its corpus or its prepared directory")
            if s.prepared and not Path(s.prepared).is_dir():
                raise ConfigError(f"data.sources[{i}].prepared: directory does not exist: {s.prepared}")


def _check_zero(cfg: Config) -> None:
    """zero.*: the stage, and a zero.ds_config file that reads and leaves our keys alone."""
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage: must be 0, 1, 2 or 3 (got {cfg.zero.stage})")
    if cfg.zero.ds_config:
        read_ds_overrides(cfg.zero.ds_config)


def _check_clip(cfg: Config) -> None:
    """clip.*: non-negative thresholds."""
    c = cfg.clip
    if c.max_norm < 0 or c.global_max_norm < 0:
        raise ConfigError("clip.max_norm: thresholds must be non-negative (0 disables)")


def _check_schedule(cfg: Config) -> None:
    """schedule.*: ratios and step counts, then the schedule itself built against train.steps."""
    s = cfg.schedule
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1] (got {s.min_lr_ratio})")
    if not 0 <= s.decay_fraction <= 1:
        raise ConfigError(f"schedule.decay_fraction: must be in [0, 1] (got {s.decay_fraction})")
    if s.warmup_steps < 0 or s.cycle_steps < 0:
        raise ConfigError("schedule.warmup_steps: warmup_steps and cycle_steps must be non-negative")
    from mupfast.optim.schedules import build_schedule  # not at import: mupfast.optim loads the config

    try:
        build_schedule(s, cfg.train.steps)
    except ValueError as e:
        raise ConfigError(f"schedule: {e}") from None
