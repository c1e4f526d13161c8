"""``mupfast export``: a trained run as a plain Hugging Face checkpoint, every μP multiplier folded in.

Inference stacks know nothing of μP: they compute ``logits = h Wᵀ``, attention with ``1/√d_head``,
plain residual sums and an unscaled embedding. Our forward multiplies in four places; each one is
linear in a single weight, so it moves into that weight exactly:

    embedding × embeddings_scale            → token (and learned position) embedding × s_emb
    logits × α_out/m                        → readout × s_out (untied when the tied weights now differ)
    attention logits × α_attn/d_head        → W_q (and b_q) × s_attn·√d_head, relative to HF's 1/√d_head
    residual branches × (L_base/L)^α        → W_o, W_down (and their biases) × s_res (CompleteP)

The folded weights are exactly the model in SP form (all four multipliers at their plain value), so
:func:`fold_multipliers` is checked against our own model under ``parametrization: sp`` before anything
is written. Two target layouts: Llama (RMSNorm, RoPE, SwiGLU; GQA as ``num_key_value_heads``) and GPT-2
(LayerNorm, learned positions, exact-GELU MLP, biases). :func:`load_run` is the run loader that
``mupfast generate`` uses too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import shutil
import sys
import unittest.mock
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mupfast.config import Config, ConfigError, ModelConfig, config_from_dict, read_raw_config, validate
from mupfast.engine import CheckpointError, checkpoint_dir, deepspeed_checkpoint_types, latest_tag
from mupfast.model import Transformer

# ----------------------------------------------------------------------------------------------
# Loading a run


@dataclass
class LoadedRun:
    """A run's resolved config and its model with the latest checkpoint's weights (eval mode)."""

    run_dir: Path
    cfg: Config
    model: Transformer
    checkpoint: Path
    """The checkpoint tag directory the weights came from."""
    step: int | None


def read_run_config(run_dir: str | Path, config: str | None = None, overrides: list[str] = ()) -> Config:
    """The resolved config of a run (``RUN/config.yaml``, or ``config`` when given) plus overrides.

    Keys that only matter while training (a corpus path, a ds_config file) are not checked here: a
    run exported on another machine must not fail because the training corpus is not there.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--run: run directory not found: {run_dir}")
    path = Path(config) if config else run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--run: {path} not found (not a run directory written by `mupfast train`?)")
    cfg = config_from_dict(read_raw_config(path, overrides))
    # Validate everything but the training-only paths (checked by `mupfast train`, not needed here).
    validate(
        replace(
            cfg,
            data=replace(cfg.data, corpus="stdlib", prepared=""),
            zero=replace(cfg.zero, ds_config=""),
        )
    )
    return cfg


def _load_weights_only(path: Path, **kwargs: Any) -> Any:
    """torch.load(weights_only=True); DeepSpeed's allow-listed types are imported only when present."""
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            return torch.load(path, weights_only=True, **kwargs)


def _zero3_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-3 checkpoint with DeepSpeed's zero_to_fp32, still reading weights-only."""
    from deepspeed.utils import zero_to_fp32

    class _WeightsOnlyTorch:  # zero_to_fp32 calls torch.load(..., weights_only=False); refuse pickles
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, **kwargs):
            return _load_weights_only(Path(f), map_location=map_location, **kwargs)

    # zero_to_fp32 prints progress on stdout; keep stdout for our own output (generate streams there).
    with unittest.mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()):
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds; the user needs one line
                raise CheckpointError(
                    f"{ckpt_dir / tag}: cannot consolidate the ZeRO-3 checkpoint ({type(e).__name__}: {e}); "
                    f"try `python -m deepspeed.utils.zero_to_fp32 {ckpt_dir} OUT --tag {tag}`"
                ) from None


def read_checkpoint_weights(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path, int | None]:
    """The model state_dict of a run's latest checkpoint, its tag directory and step."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint (no 'latest' file); train the run first")
    tag_dir = ckpt_dir / tag
    # ZeRO 0–2 keep the whole module state_dict in mp_rank_00_model_states.pt; ZeRO-3 partitions it
    # over the ranks' zero_pp_rank_*_mp_rank_00_model_states.pt (empty "module" tensors there).
    full = tag_dir / "mp_rank_00_model_states.pt"
    zero3 = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    states = full if full.is_file() else (zero3[0] if zero3 else None)
    if states is None:
        raise CheckpointError(
            f"{tag_dir}: no model-states file (mp_rank_00_model_states.pt) in the checkpoint"
        )
    try:
        blob = _load_weights_only(states, mmap=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{states}: cannot read ({type(e).__name__}: {msg})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
        raise CheckpointError(f"{states}: holds no 'module' state_dict")
    step = blob.get("step") if isinstance(blob.get("step"), int) else None
    if states is full:
        return blob["module"], tag_dir, step
    return _zero3_state_dict(ckpt_dir, tag), tag_dir, step


def load_run(
    run_dir: str | Path,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    device: torch.device | str = "cpu",
) -> LoadedRun:
    """Rebuild a run's model from its config.yaml and load the latest checkpoint's weights (fp32, eval)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, config, list(overrides))
    state, tag_dir, step = read_checkpoint_weights(run_dir)
    # "auto" backends: Triton only where there is CUDA (a run trained with triton loads on a CPU too).
    model_cfg = replace(cfg.model, attention_backend="auto", readout_backend="auto")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{tag_dir}: weights do not match the run config's model ({what})")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{tag_dir}: weights do not fit the run's model config ({first})") from None
    _rebuild_buffers(model, cfg.model)
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, tag_dir, step)


def _rebuild_buffers(model: Transformer, cfg: ModelConfig) -> None:
    """Non-persistent buffers (RoPE tables) are not in checkpoints; meta-built ones get real values."""
    from mupfast.model import Rotary

    for block in model.blocks:
        if block.attn.rotary is not None:
            block.attn.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


# ----------------------------------------------------------------------------------------------
# Folding


def layout_for(cfg: ModelConfig) -> str:
    """``llama`` (RMSNorm/RoPE/SwiGLU) or ``gpt2`` (LayerNorm/learned/GELU); anything else is an error."""
    if cfg.position == "rope":
        layout, need = "llama", {"norm": "rmsnorm", "mlp": "swiglu"}
    else:
        layout, need = "gpt2", {"norm": "layernorm", "mlp": "gelu"}
    for key, value in need.items():
        if getattr(cfg, key) != value:
            raise ConfigError(
                f"model.{key}: {getattr(cfg, key)} cannot be exported with model.position={cfg.position} "
                f"(the {layout} layout needs model.{key}={value})"
            )
    if layout == "gpt2" and cfg.kv_heads != cfg.num_heads:
        raise ConfigError(
            f"model.num_kv_heads: the GPT-2 layout has no grouped-query attention "
            f"({cfg.kv_heads} kv heads for {cfg.num_heads} query heads)"
        )
    return layout


@dataclass
class Folded:
    """Weights in our parameter names, every μP multiplier folded in (the model in SP form)."""

    state: dict[str, torch.Tensor]
    tied: bool
    """The readout still equals the embedding (tied in the export)."""
    factors: dict[str, float]
    """The folded multipliers, for the record."""


@torch.no_grad()
def fold_multipliers(model: Transformer) -> Folded:
    """Fold the forward multipliers the model really uses into its weights (fp32; products rounded once)."""
    cfg = model.cfg
    s_emb = float(model.embedding_scale)
    s_out = float(model.readout.logit_scale)
    s_attn = float(model.blocks[0].attn.scale) if len(model.blocks) else 1.0 / math.sqrt(cfg.head_dim)
    s_res = float(model.blocks[0].residual_scale) if len(model.blocks) else 1.0
    q_factor = s_attn * math.sqrt(cfg.head_dim)  # HF layouts divide by √d_head
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}

    def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
        return t if factor == 1.0 else (t.double() * factor).float()

    out = dict(sd)  # unscaled tensors are shared, not copied
    out["tok_emb.weight"] = scaled(sd["tok_emb.weight"], s_emb)
    if "pos_emb.weight" in sd:  # the scale multiplies (token + position)
        out["pos_emb.weight"] = scaled(sd["pos_emb.weight"], s_emb)
    readout = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["readout.weight"]
    tied = cfg.tie_embeddings and math.isclose(s_emb, s_out, rel_tol=1e-12)
    if tied:
        out.pop("readout.weight", None)
    else:  # untied: the tied weight serves two different products once folded
        out["readout.weight"] = scaled(readout, s_out)
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for name in ("attn.q.weight", "attn.q.bias"):
            if p + name in sd:
                out[p + name] = scaled(sd[p + name], q_factor)
        for name in ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias"):
            if p + name in sd:
                out[p + name] = scaled(sd[p + name], s_res)
    factors = {
        "embedding": s_emb,
        "readout": s_out,
        "attention_q": q_factor,
        "residual_branches": s_res,
    }
    return Folded(out, tied, factors)


def sp_config(cfg: ModelConfig, tied: bool) -> ModelConfig:
    """The config under which the folded weights compute the same function (plain multipliers)."""
    return dataclasses.replace(
        cfg, parametrization="sp", tie_embeddings=tied, attention_backend="torch", readout_backend="torch"
    )


@torch.no_grad()
def check_folding(model: Transformer, folded: Folded, *, seq_len: int = 16, tol: float = 1e-4) -> float:
    """Max |Δlogit| / (1 + max |logit|) between the model and its folded SP twin (fp32); raises above tol."""
    cfg = model.cfg
    with torch.device("meta"):
        twin = Transformer(sp_config(cfg, folded.tied))
    twin.load_state_dict(folded.state, assign=True)  # shares the folded tensors: no copy
    _rebuild_buffers(twin, cfg)
    twin.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, min(seq_len, cfg.max_seq_len)), generator=gen)
    ref, got = model(tokens.to(device)).cpu(), twin(tokens)
    err = ((got - ref).abs().max() / (1 + ref.abs().max())).item()
    if not err <= tol:
        raise RuntimeError(f"folded model differs from the μP model: relative logit error {err:.2e}")
    return err


# ----------------------------------------------------------------------------------------------
# Target layouts


def _llama_tensors(cfg: ModelConfig, f: Folded) -> dict[str, torch.Tensor]:
    s = f.state
    out = {"model.embed_tokens.weight": s["tok_emb.weight"], "model.norm.weight": s["final_norm.weight"]}
    names = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.o_proj",
        "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "mlp_norm": "post_attention_layernorm",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{ours}.{kind}"
                if key in s:
                    out[f"model.layers.{i}.{theirs}.{kind}"] = s[key]
    if not f.tied:
        out["lm_head.weight"] = s["readout.weight"]
    return out


def _gpt2_tensors(cfg: ModelConfig, f: Folded) -> dict[str, torch.Tensor]:
    s, d = f.state, cfg.hidden_size

    def bias(key: str, n: int) -> torch.Tensor:  # bias=false models: HF GPT-2 always has biases
        return s.get(key, torch.zeros(n, dtype=torch.float64))

    out = {
        "transformer.wte.weight": s["tok_emb.weight"],
        "transformer.wpe.weight": s["pos_emb.weight"],
        "transformer.ln_f.weight": s["final_norm.weight"],
        "transformer.ln_f.bias": s["final_norm.bias"],
    }
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{h}{theirs}.weight"] = s[f"{b}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = s[f"{b}{ours}.bias"]
        # HF Conv1D stores (in, out): our Linear weights transposed. c_attn is q, k, v stacked.
        qkv = [s[f"{b}attn.{n}.weight"] for n in "qkv"]
        out[f"{h}attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[f"{h}attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.{n}.bias", d) for n in "qkv"])
        out[f"{h}attn.c_proj.weight"] = s[f"{b}attn.o.weight"].t()
        out[f"{h}attn.c_proj.bias"] = bias(f"{b}attn.o.bias", d)
        out[f"{h}mlp.c_fc.weight"] = s[f"{b}mlp.up.weight"].t()
        out[f"{h}mlp.c_fc.bias"] = bias(f"{b}mlp.up.bias", cfg.filter_size)
        out[f"{h}mlp.c_proj.weight"] = s[f"{b}mlp.down.weight"].t()
        out[f"{h}mlp.c_proj.bias"] = bias(f"{b}mlp.down.bias", d)
    if not f.tied:
        out["lm_head.weight"] = s["readout.weight"]
    return out


def hf_config(cfg: ModelConfig, layout: str, tied: bool, dtype: str) -> dict[str, Any]:
    """config.json of the export (written by hand: exporting needs no `transformers`)."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        "bos_token_id": None,  # our corpora have no special tokens
        "eos_token_id": None,
    }
    if layout == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.filter_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4.x
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "attention_dropout": 0.0,
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.filter_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_seq_len,
        "activation_function": "gelu",  # exact erf GELU, as F.gelu (gelu_new would be the tanh form)
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **common,
    }


# ----------------------------------------------------------------------------------------------
# Tokenizer


def run_tokenizer(cfg: Config, run_dir: Path | None = None):
    """The run's tokenizer: byte-level needs nothing; BPE is the copy the trainer keeps in the run
    directory, else the prepared data directory's."""
    from mupfast.data import BPETokenizer, ByteTokenizer, load_prepared, prepare_data

    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    if run_dir is not None and (Path(run_dir) / "tokenizer.json").is_file():
        return BPETokenizer.load(Path(run_dir) / "tokenizer.json")
    if cfg.data.prepared:
        return load_prepared(cfg.data.prepared).tokenizer()
    return prepare_data(cfg.data, progress=False).tokenizer()  # cached by corpus fingerprint


def byte_level_tokenizer_json() -> str:
    """A HF ``tokenizers`` JSON whose ids are the UTF-8 bytes (id = byte value), like ByteTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 uses for bytes
    byte_to_char = _bytes_to_unicode()
    assert sorted(byte_to_char.values()) == sorted(table)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the one ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ----------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    out_dir: Path
    layout: str
    tied: bool
    factors: dict[str, float]
    fold_error: float
    files: list[str]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    config: str | None = None,
    overrides: list[str] = (),
    force: bool = False,
) -> ExportResult:
    """Write RUN's latest checkpoint to OUT as safetensors + HF config + tokenizer, μP folded in."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype: must be one of {', '.join(_DTYPES)} (got {dtype!r})")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise ConfigError(f"--out: {out_dir} exists and is not empty (pass --force to overwrite)")
    run = load_run(run_dir, config=config, overrides=overrides)
    cfg = run.cfg
    layout = layout_for(cfg.model)
    tokenizer = run_tokenizer(cfg, run.run_dir)
    folded = fold_multipliers(run.model)
    err = check_folding(run.model, folded)
    tensors = (_llama_tensors if layout == "llama" else _gpt2_tensors)(cfg.model, folded)
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in tensors.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config_json = hf_config(cfg.model, layout, folded.tied, dtype)
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    generation = {"max_length": cfg.model.max_seq_len, "do_sample": True, "temperature": 1.0}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer.kind == "bpe":
        tokenizer.save(out_dir / "tokenizer.json")
        how = "tokenizer.json: the run's byte-level BPE (HF tokenizers), ids as in training"
    else:
        (out_dir / "tokenizer.json").write_text(byte_level_tokenizer_json())
        how = "byte-level: token id = UTF-8 byte value (0–255); tokenizer.json does exactly that"
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.max_seq_len}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    shutil.copyfile(run.run_dir / "config.yaml", out_dir / "mupfast_config.yaml")
    record = {
        "source_run": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.step,
        "layout": layout,
        "dtype": dtype,
        "parametrization": cfg.model.parametrization,
        "folded_multipliers": folded.factors,
        "readout_tied": folded.tied,
        "fold_check_relative_logit_error": err,
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "how_to_encode": how},
    }
    (out_dir / "mupfast_export.json").write_text(json.dumps(record, indent=2) + "\n")
    files = sorted(p.name for p in out_dir.iterdir())
    return ExportResult(out_dir, layout, folded.tied, folded.factors, err, files)


def main(args, overrides: list[str]) -> int:
    """The ``mupfast export`` verb."""
    if not args.run:
        raise ConfigError("export: --run DIR is required")
    if not args.out:
        raise ConfigError("export: --out DIR is required")
    res = export_run(
        args.run, args.out, dtype=args.dtype, config=args.config, overrides=overrides, force=args.force
    )
    f = res.factors
    print(
        f"exported {args.run} to {res.out_dir} ({res.layout} layout, readout {'tied' if res.tied else 'untied'}; "
        f"folded: embedding × {f['embedding']:.6g}, readout × {f['readout']:.6g}, W_q × {f['attention_q']:.6g}, "
        f"residual × {f['residual_branches']:.6g}; fold check {res.fold_error:.1e})"
    )
    return 0
