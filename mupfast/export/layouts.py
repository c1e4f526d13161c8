"""The Hugging Face layouts an export writes: tensor names, config.json and the byte-level tokenizer.

Two layouts, chosen by :func:`layout_for` from the model config: Llama (RMSNorm, RoPE, SwiGLU; GQA
as ``num_key_value_heads``) and GPT-2 (LayerNorm, learned positions, exact-GELU MLP, biases; HF
Conv1D weights transposed). Both map the folded weights of :mod:`mupfast.export.fold` one to one;
``config.json`` is written by hand, so exporting needs no ``transformers``.
"""

from __future__ import annotations

from typing import Any

import torch

from mupfast.config import ModelConfig
from mupfast.errors import ConfigError
from mupfast.export.fold import Folded


def layout_for(cfg: ModelConfig) -> str:
    """``llama`` (RMSNorm/RoPE/SwiGLU) or ``gpt2`` (LayerNorm/learned/GELU); anything else is an error."""
    if cfg.moe_experts:
        raise ConfigError(
            f"model.moe_experts: {cfg.moe_experts} — a SqrtGate MoE has no Llama or GPT-2 layout to export to "
            "(√g gates, shared-expert mix); sample it with `mupfast generate --run DIR` instead"
        )
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


_LLAMA_MODULES = {
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


def llama_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name → its name in the Llama layout (Granite's too)."""
    out = {
        "tok_emb.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "readout.weight": "lm_head.weight",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in _LLAMA_MODULES.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = f"model.layers.{i}.{theirs}.{kind}"
    return out


def _llama_tensors(cfg: ModelConfig, f: Folded) -> dict[str, torch.Tensor]:
    names = llama_names(cfg)
    out = {theirs: f.state[ours] for ours, theirs in names.items() if ours in f.state}
    if f.tied:
        out.pop("lm_head.weight", None)
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


def layout_tensors(cfg: ModelConfig, layout: str, f: Folded) -> dict[str, torch.Tensor]:
    """The folded weights under the layout's tensor names (``layout`` from :func:`layout_for`)."""
    return (_llama_tensors if layout == "llama" else _gpt2_tensors)(cfg, f)


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
