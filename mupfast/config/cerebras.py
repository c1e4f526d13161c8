"""A Cerebras Model Zoo config as a mupfast config that trains the same μP model.

Both of Model Zoo's formats are read: the old one (top-level ``model:``, ``optimizer:``,
``runconfig:``, ``train_input:``; μP either by ``mup_base_*`` or by multipliers written out:
``adjust_learning_rate.decoder_kernel`` = 1/m, ``output_logits_scale`` = α/m, stds already scaled)
and the new one (``trainer: init: model/optimizer/schedulers/precision/loop``, ``fit:``).

Model Zoo's code fixes what its configs leave out, and the import resolves it the same way
(gpt2_model.py): every std falls back to ``initializer`` and then to ``initializer_range`` (0.02),
truncated at ±2 std; under μP o's and ffn_out's stds fall back to ``initializer_range``, not to
``initializer``. The result names every std it uses, so mupfast's defaults never decide.

:func:`from_model_zoo` returns the mupfast mapping and one note per key whose training the
imported config does not reproduce (key, value, what it does instead). A :class:`ConfigError` is
raised only where the result would train another μP model (an init μP cannot scale, custom lr
groups, unscaled attention, another optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mupfast.errors import ConfigError

#: Model Zoo's initializer_range default and truncation (TruncatedNormalInitializer: a, b = ∓2 std).
DEFAULT_STD = 0.02
DEFAULT_TRUNCATION = 2.0


@dataclass
class ModelZoo:
    """The parts of a Model Zoo config a training run depends on, from either format."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    optimizer_type: str
    segments: list[dict[str, Any]]
    max_gradient_norm: float
    max_steps: int | None
    batch_size: int | None
    precision: str
    run: dict[str, Any] = field(default_factory=dict)


@dataclass
class Imported:
    config: dict[str, Any]
    notes: list[str]


def _section(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: expected a mapping (got {value!r})")
    return value


def read_model_zoo(raw: Any) -> ModelZoo:
    """The training-relevant parts of a Model Zoo config mapping, old or new format."""
    if not isinstance(raw, dict):
        raise ConfigError("not a Model Zoo config: the top level must be a mapping")
    if "trainer" in raw:
        return _read_new(raw)
    if "model" in raw:
        return _read_old(raw)
    raise ConfigError("not a Model Zoo config: it has neither trainer: (new format) nor model: (old format)")


def _read_new(raw: dict) -> ModelZoo:
    trainer = raw["trainer"]
    if isinstance(trainer, list):
        raise ConfigError(
            "trainer: a list of trainers (a multi-phase run); import each phase as its own file"
        )
    init = _section(trainer, "init", "trainer.")
    optimizers = _section(init, "optimizer", "trainer.init.")
    if len(optimizers) != 1:
        raise ConfigError(
            f"trainer.init.optimizer: expected one optimizer (got {list(optimizers) or 'none'})"
        )
    ((opt_type, opt),) = optimizers.items()
    opt = dict(opt or {})
    schedulers = init.get("schedulers") or []
    lr_schedulers = [s for s in schedulers if isinstance(s, dict)]
    if len(lr_schedulers) > 1:
        raise ConfigError(f"trainer.init.schedulers: expected one lr scheduler (got {len(lr_schedulers)})")
    precision = _section(init, "precision", "trainer.init.")
    loop = _section(init, "loop", "trainer.init.")
    loader = _section(_section(trainer, "fit", "trainer."), "train_dataloader", "trainer.fit.")
    return ModelZoo(
        model=_section(init, "model", "trainer.init."),
        optimizer=opt,
        optimizer_type=str(opt_type),
        segments=_new_segments(lr_schedulers[0]) if lr_schedulers else _constant(opt.get("learning_rate")),
        max_gradient_norm=float(precision.get("max_gradient_norm") or 0.0),
        max_steps=loop.get("max_steps"),
        batch_size=loader.get("batch_size"),
        precision=_precision(precision.get("enabled", True), precision.get("fp16_type", "bfloat16")),
        run={
            "eval_every": loop.get("eval_frequency"),
            "save_every": _section(init, "checkpoint", "trainer.init.").get("steps"),
            "log_every": _section(init, "logging", "trainer.init.").get("log_steps"),
            "data_dir": loader.get("data_dir"),
        },
    )


def _read_old(raw: dict) -> ModelZoo:
    model = _section(raw, "model", "")
    opt = dict(_section(raw, "optimizer", ""))
    if "beta1" in opt or "beta2" in opt:
        opt["betas"] = [opt.pop("beta1", 0.9), opt.pop("beta2", 0.999)]
    if "weight_decay_rate" in opt:
        opt["weight_decay"] = opt.pop("weight_decay_rate")
    runconfig = _section(raw, "runconfig", "")
    train_input = _section(raw, "train_input", "")
    half = model.get("use_bfloat16") and "bfloat16" or "float16"
    return ModelZoo(
        model=model,
        optimizer=opt,
        optimizer_type=str(opt.pop("optimizer_type", "AdamW")),
        segments=_old_segments(opt.pop("learning_rate", None)),
        max_gradient_norm=float(opt.pop("max_gradient_norm", 0.0) or 0.0),
        max_steps=runconfig.get("max_steps"),
        batch_size=train_input.get("batch_size"),
        precision=_precision(model.get("mixed_precision", False), half),
        run={
            "save_every": runconfig.get("checkpoint_steps"),
            "log_every": runconfig.get("log_steps"),
            "data_dir": train_input.get("data_dir"),
        },
    )


def _precision(enabled: Any, half: Any) -> str:
    return "fp32" if not enabled else str(half)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules: a list of segments {kind, initial, end, steps}


_NEW_KINDS = {"LinearLR": "linear", "CosineDecayLR": "cosine", "ConstantLR": "constant"}
_OLD_KINDS = {"linear": "linear", "cosinedecay": "cosine", "constant": "constant"}


def _constant(lr: Any) -> list[dict[str, Any]]:
    if lr is None:
        raise ConfigError("no learning rate: the config has neither a scheduler nor optimizer.learning_rate")
    return [{"kind": "constant", "initial": float(lr), "end": float(lr), "steps": None}]


def _segment(kind: str | None, spec: dict, name: str) -> dict[str, Any]:
    if kind is None:
        raise ConfigError(
            f"scheduler {name}: no mupfast schedule is built from it (linear, cosine and constant are)"
        )
    initial = spec.get("initial_learning_rate", spec.get("learning_rate"))
    end = spec.get("end_learning_rate", initial)
    steps = spec.get("total_iters", spec.get("steps", spec.get("decay_steps")))
    if initial is None:
        raise ConfigError(f"scheduler {name}: no initial_learning_rate")
    return {"kind": kind, "initial": float(initial), "end": float(end), "steps": steps}


def _new_segments(entry: dict) -> list[dict[str, Any]]:
    ((name, spec),) = entry.items()
    if name == "SequentialLR":
        return [seg for inner in (spec or {}).get("schedulers", []) for seg in _new_segments(inner)]
    return [_segment(_NEW_KINDS.get(name), spec or {}, name)]


def _old_segments(lr: Any) -> list[dict[str, Any]]:
    if not isinstance(lr, list):
        return _constant(lr)
    out = []
    for spec in lr:
        name = str(spec.get("scheduler", ""))
        out.append(_segment(_OLD_KINDS.get(name.lower()), spec, name))
    return out


def _ratio(end: float, peak: float) -> float:
    # 12 significant digits: 0.0006 / 0.006 is written 0.1, not 0.09999999999999999.
    return float(f"{end / peak:.12g}")


def schedule_of(
    segments: list[dict[str, Any]], max_steps: int | None, notes: list[str]
) -> tuple[float, int, dict]:
    """(peak lr, steps, schedule section) reproducing the segments: warmup from 0, then one decay."""
    segs = list(segments)
    warmup = 0
    if len(segs) > 1 and segs[0]["kind"] == "linear" and segs[0]["end"] > segs[0]["initial"]:
        first = segs.pop(0)
        warmup = int(first["steps"])
        if first["initial"] != 0.0:
            notes.append(f"schedulers: warmup from {first['initial']:g}: the imported warmup starts at 0")
    if len(segs) != 1:
        raise ConfigError(
            f"schedulers: {len(segments)} segments: mupfast's schedules are a warmup and one decay"
        )
    seg = segs[0]
    peak = seg["initial"]
    total = warmup + int(seg["steps"]) if seg["steps"] is not None else int(max_steps or 0)
    if max_steps and total != int(max_steps):
        notes.append(
            f"schedulers: end at step {total}, loop.max_steps is {max_steps}: the imported run trains "
            f"{max_steps} steps with the decay ending at its last"
        )
        total = int(max_steps)
    schedule: dict[str, Any] = {"warmup_steps": warmup, "warmup_from_zero": True}
    if seg["kind"] == "constant":
        schedule["kind"] = "constant"
    elif seg["kind"] == "cosine":
        schedule.update(kind="cosine", min_lr_ratio=_ratio(seg["end"], peak))
    else:  # linear decay over the rest of the run: WSD without a stable phase
        schedule.update(kind="wsd", decay_shape="linear", min_lr_ratio=_ratio(seg["end"], peak))
        schedule["decay_fraction"] = (total - warmup) / total
    return peak, total, schedule


# ----------------------------------------------------------------------------------------------
# The model


def _flag_note(notes: list[str], key: str, value: Any, instead: str) -> None:
    notes.append(f"model.{key}: {value!r}: {instead}")


def _architecture(m: dict, notes: list[str]) -> dict[str, Any]:
    """Sizes, norm, positions, MLP, biases, with a note for each setting mupfast trains otherwise."""
    out: dict[str, Any] = {
        "vocab_size": int(m["vocab_size"]),
        "hidden_size": int(m["hidden_size"]),
        "num_layers": int(m["num_hidden_layers"]),
        "num_heads": int(m["num_heads"]),
        "filter_size": int(m["filter_size"]),
        "max_seq_len": int(m.get("max_position_embeddings", 1024)),
        "norm_eps": float(m.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(m.get("share_embedding_weights", True)),
    }
    if m.get("extra_attention_params", {}).get("num_kv_groups"):
        out["num_kv_heads"] = int(m["extra_attention_params"]["num_kv_groups"])
    norm = str(m.get("norm_type", "layernorm")).lower()
    out["norm"] = "rmsnorm" if norm == "rmsnorm" else "layernorm"
    if norm not in ("layernorm", "rmsnorm"):
        _flag_note(notes, "norm_type", norm, "the imported config uses layernorm")
    position = str(m.get("position_embedding_type", "learned")).lower()
    out["position"] = "rope" if position == "rotary" else "learned"
    if position == "rotary":
        out["rope_theta"] = float(m.get("rope_theta", 10000.0))
    elif position != "learned" or m.get("use_position_embedding") is False:
        out["position"] = "rope"
        _flag_note(notes, "position_embedding_type", position, "mupfast has no such positions; RoPE instead")
    act = str(m.get("nonlinearity", "gelu")).lower()
    out["mlp"] = "swiglu" if act == "swiglu" else "gelu"
    if act not in ("gelu", "swiglu"):
        _flag_note(notes, "nonlinearity", act, "the imported config uses gelu")
    biases = [
        bool(m.get(k, True))
        for k in ("use_projection_bias_in_attention", "use_ffn_bias_in_attention", "use_ffn_bias")
    ]
    out["bias"] = biases[-1]
    if len(set(biases)) > 1:
        notes.append(
            f"model: biases {biases} (attention projections, attention output, FFN): mupfast has one "
            f"switch; model.bias = {biases[-1]} for all"
        )
    for key in ("dropout_rate", "attention_dropout_rate", "embedding_dropout_rate"):
        if float(m.get(key) or 0.0) > 0:
            _flag_note(notes, key, m[key], "mupfast trains without dropout")
    for key, instead in (
        ("use_bias_in_output", "the readout has no bias"),
        ("embedding_layer_norm", "no norm after the embedding"),
    ):
        if m.get(key):
            _flag_note(notes, key, m[key], instead)
    return out


def _refuse_other_mup(m: dict) -> None:
    """Settings under which the import would train another μP model."""
    attention = str(m.get("attention_type", "scaled_dot_product"))
    if attention != "scaled_dot_product":
        raise ConfigError(
            f"model.attention_type: {attention!r}: mupfast scales attention logits by 1/d or 1/√d only"
        )
    if m.get("scale_qk_dot_by_layer_idx"):
        raise ConfigError("model.scale_qk_dot_by_layer_idx: true: mupfast has no per-layer attention scale")
    if m.get("lr_adjustment_groups"):
        raise ConfigError(
            "model.lr_adjustment_groups: custom lr groups: mupfast's per-group lrs come from its μP rules"
        )
    if (m.get("moe") or m.get("moe_params") or {}).get("num_experts", 1) > 1:
        raise ConfigError("model.moe: Model Zoo's MoE: its routing and expert rules differ from mupfast's")


# ----------------------------------------------------------------------------------------------
# Initializers and μP


def _initializer(spec: Any, key: str) -> tuple[float, float] | None:
    """(std, truncation in stds) of a Model Zoo initializer, None when it is not given."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    name = str(spec.get("name", "")).lower()
    if name not in ("normal", "truncated_normal") or float(spec.get("mean", 0.0)) != 0.0:
        raise ConfigError(
            f"model.{key}: {spec!r}: μP scales only zero-mean normal and truncated normal inits"
        )
    std = float(spec.get("std", 0.05))  # Model Zoo's default std for both
    if name == "normal":
        return std, 0.0
    a, b = float(spec.get("a", -2 * std)), float(spec.get("b", 2 * std))
    if not math.isclose(a, -b, rel_tol=1e-9):
        raise ConfigError(
            f"model.{key}: truncation [{a:g}, {b:g}] is not symmetric; mupfast truncates at ± k std"
        )
    return std, b / std


def _stds(m: dict, mup: bool) -> dict[str, tuple[float, float]]:
    """Each component's init as Model Zoo's code applies it before its own μP scaling (gpt2_model.py)."""
    default = (float(m.get("initializer_range", DEFAULT_STD)), DEFAULT_TRUNCATION)
    given = {
        k: _initializer(m.get(k), k)
        for k in (
            "initializer",
            "ffn_initializer",
            "embedding_initializer",
            "output_layer_initializer",
            "ffn_output_layer_initializer",
        )
    }
    attn = given["initializer"] or default
    out = {
        "init_std": attn,
        "ffn_in_init_std": given["ffn_initializer"] or attn,
        "embedding_init_std": given["embedding_initializer"] or default,
    }
    if mup:  # μP falls back to initializer_range for o and ffn_out, not to initializer
        out["o_init_std"] = given["output_layer_initializer"] or default
        out["ffn_out_init_std"] = given["ffn_output_layer_initializer"] or default
        return out
    depth = 1 / math.sqrt(2 * int(m["num_hidden_layers"]))
    o = given["output_layer_initializer"]
    if o is None and given["initializer"] is None:
        o = (default[0] * depth, default[1])
    out["o_init_std"] = o or attn  # the attention layer's own initializer when none is given
    out["ffn_out_init_std"] = given["ffn_output_layer_initializer"] or o or out["ffn_in_init_std"]
    return out


def _mup(m: dict, optimizer: dict, notes: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """The μP keys, and the factor that turns each Model Zoo std into mupfast's key of it.

    New-style μP (``mup_base_*``) scales like mupfast, so the stds carry over; old-style μP wrote
    them already scaled (× 1/√m, o and ffn_out also × 1/√(2L)), and SP wrote o's depth scaling out."""
    hidden, filt, layers = int(m["hidden_size"]), int(m["filter_size"]), int(m["num_hidden_layers"])
    keep = {
        k: m[k]
        for k in (
            "embeddings_scale",
            "scale_qk_dot_by_d",
            "attention_logits_alpha",
            "scale_output_logits_by_d",
        )
        if m.get(k) is not None
    }
    if keep.get("scale_qk_dot_by_d") is None:
        keep["scale_qk_dot_by_d"] = False  # Model Zoo's default: 1/√d
    depth = math.sqrt(2 * layers)
    if m.get("mup_base_hidden_size"):
        out = {
            "parametrization": "mup",
            "mup_base_hidden_size": float(m["mup_base_hidden_size"]),
            "output_logits_alpha": float(m.get("output_logits_alpha") or 1.0),
            **keep,
        }
        if m.get("mup_base_filter_size") is not None:
            out["mup_base_filter_size"] = float(m["mup_base_filter_size"])
        return out, {}
    kernel = (optimizer.pop("adjust_learning_rate", None) or {}).get("decoder_kernel")
    if kernel is None and m.get("output_logits_scale") is None:
        for key, value in keep.items():
            if value not in (1, 1.0, False):
                _flag_note(
                    notes, key, value, "mupfast's sp ignores it (no mup_base_hidden_size: Model Zoo's SP)"
                )
        return {"parametrization": "sp"}, {"o_init_std": depth, "ffn_out_init_std": depth}
    if kernel is None:
        raise ConfigError(
            "model.output_logits_scale without optimizer.adjust_learning_rate.decoder_kernel: "
            "the width multiplier m (= 1/decoder_kernel) is not given"
        )
    width = 1.0 / float(kernel)
    alpha = float(m.get("output_logits_scale", 1.0)) * width
    out = {
        "parametrization": "mup",
        "mup_base_hidden_size": hidden / width,
        "mup_base_filter_size": filt / width,
        "output_logits_alpha": alpha,
        "scale_output_logits_by_d": True,
        **keep,
    }
    notes.append(
        f"optimizer.adjust_learning_rate.decoder_kernel: {kernel:g}: μP with m = {width:g} "
        f"(mup_base_hidden_size {hidden / width:g}), the written stds unscaled by √m"
    )
    hidden_factor = math.sqrt(width)
    factors = {
        "init_std": hidden_factor,
        "ffn_in_init_std": hidden_factor,
        "o_init_std": hidden_factor * depth,
        "ffn_out_init_std": hidden_factor * depth,
    }
    return out, factors


def _model(m: dict, optimizer: dict, notes: list[str]) -> dict[str, Any]:
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "filter_size")
        if k not in m
    ]
    if missing:
        raise ConfigError(f"model: {', '.join(missing)} missing")
    _refuse_other_mup(m)
    out = _architecture(m, notes)
    mup, factors = _mup(m, optimizer, notes)
    out.update(mup)
    stds = _stds(m, mup=bool(m.get("mup_base_hidden_size")))
    truncations = {t for _, t in stds.values()}
    if len(truncations) > 1:
        raise ConfigError(
            f"model: initializers truncated at {sorted(truncations)} stds; mupfast truncates all alike"
        )
    for key, (std, _) in stds.items():
        out[key] = std * factors.get(key, 1.0)
    out["init_truncation"] = truncations.pop()
    if not out["tie_embeddings"]:
        out["output_init_std"] = float(m.get("initializer_range", DEFAULT_STD))
        if out["init_truncation"]:
            notes.append(
                "model.share_embedding_weights: false: Model Zoo draws the lm_head from a plain normal; "
                "mupfast truncates it like every other init"
            )
    return out


# ----------------------------------------------------------------------------------------------
# The whole config


def _optim(mz: ModelZoo, notes: list[str]) -> dict[str, Any]:
    if mz.optimizer_type.lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer: {mz.optimizer_type}: mupfast's μP rules are for AdamW")
    opt = mz.optimizer
    betas = opt.get("betas") or [0.9, 0.999]
    out = {
        "beta1": float(betas[0]),
        "beta2": float(betas[1]),
        "eps": float(opt.get("eps", 1e-6)),
        "weight_decay": float(opt.get("weight_decay", 0.0) or 0.0),
    }
    if opt.get("correct_bias") is False:
        notes.append("optimizer.correct_bias: false: mupfast's AdamW always corrects the moments' bias")
    if mz.optimizer_type.lower() == "adam" and out["weight_decay"]:
        notes.append(
            "optimizer: Adam with weight_decay (L2 in the gradient): mupfast decays decoupled, as AdamW"
        )
    return out


def _train(mz: ModelZoo, steps: int, seq_len: int, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": steps, "seq_len": seq_len}
    if mz.batch_size:
        out.update(micro_batch_size=int(mz.batch_size), grad_accum_steps=1)
        notes.append(
            f"batch_size: {mz.batch_size} sequences a step: mupfast's train.micro_batch_size is per rank; "
            f"on N GPUs keep micro_batch_size × grad_accum_steps × N = {mz.batch_size}"
        )
    if mz.precision in ("bfloat16", "cbfloat16", "float16"):
        out["precision"] = "bf16"
        if mz.precision != "bfloat16":
            notes.append(f"precision: {mz.precision}: mupfast trains mixed precision in bf16")
    else:
        out["precision"] = "fp32"
    for key in ("eval_every", "save_every", "log_every"):
        if mz.run.get(key):
            out[key] = int(mz.run[key])
    return out


def from_model_zoo(raw: Any) -> Imported:
    """The mupfast config mapping that trains ``raw``'s model, and a note per difference."""
    mz = read_model_zoo(raw)
    notes: list[str] = []
    model = _model(mz.model, mz.optimizer, notes)
    model["weight_decay_scaling"] = "coupled"  # Model Zoo's AdamW decays by lr × lr multiplier × wd
    lr, steps, schedule = schedule_of(mz.segments, mz.max_steps, notes)
    optim = {"lr": lr, **_optim(mz, notes)}
    clip = {"max_norm": 0.0, "global_max_norm": mz.max_gradient_norm}
    train = _train(mz, steps, model["max_seq_len"], notes)
    if mz.run.get("data_dir"):
        notes.append(
            "train_input.data_dir: Model Zoo's HDF5 shards: set data.corpus to the documents and "
            f"data.tokenizer to the tokenizer.json of the {model['vocab_size']}-token vocabulary"
        )
    config = {"model": model, "optim": optim, "clip": clip, "schedule": schedule, "train": train}
    return Imported(config=config, notes=notes)
