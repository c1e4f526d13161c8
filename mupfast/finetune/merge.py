"""A fine-tune's adapters outside the trainer: merged into the weights, or as a PEFT LoRA folder.

:func:`merge_adapters` replaces every adapted layer by a plain ``nn.Linear`` holding W + ΔW (LoRA:
(α/r)·B·A; AdaLoRA: (α/r₀)·P·diag(λ ⊙ mask)·Q) and checks that the merged model computes the
adapted model's logits; ``mupfast export`` then folds and writes it like any run. AdaMoLE has no
single ΔW (its gate picks experts per token), so it cannot be merged.

:func:`write_peft_adapter` (``mupfast export --adapters-only``) writes ``adapter_config.json`` and
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads onto
the export of the base run. Every adapter is written in LoRA form ΔW = B'·A' with its scale and the
μP multiplier the export folds into that matrix (W_q's attention scale, W_o's and W_down's residual
scale) put into B', and lora_alpha = r per module (PEFT's scale α/r = 1). AdaLoRA's pruned triplets
are dropped, so each module gets its own rank (``rank_pattern``). GPT-2's fused ``c_attn`` gets q,
k and v's adapters side by side (A stacked, B block-diagonal).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from mupfast.errors import ConfigError
from mupfast.finetune.lora import AdaptedLinear, adapted_modules


def _check_mergeable(modules: dict[str, AdaptedLinear]) -> None:
    for path, m in modules.items():
        if not m.adapter.mergeable:
            raise ConfigError(
                f"finetune.method: {m.adapter.kind} adapters ({path}) choose their experts per token, so "
                "there is no single weight to merge them into and no PEFT LoRA form; sample the run with "
                "`mupfast generate --run DIR`"
            )


@torch.no_grad()
def merge_adapters(model: nn.Module, *, check: bool = True, tol: float = 1e-4) -> nn.Module:
    """``model`` with every adapted layer replaced by its merged ``nn.Linear`` (in place; returned).

    With ``check`` the merged model's logits are compared with the adapted model's on random tokens
    (fp32): max |Δlogit| / (1 + max |logit|) above ``tol`` is an error."""
    modules = adapted_modules(model)
    if not modules:
        return model
    _check_mergeable(modules)
    tokens = None
    if check:
        gen = torch.Generator().manual_seed(0)
        cfg = model.cfg
        tokens = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=gen)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        ref = model(tokens.to(device)).float().cpu()
    for path, m in modules.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.merged())
    if check:
        got = model(tokens.to(device)).float().cpu()
        model.train(was_training)
        err = ((got - ref).abs().max() / (1 + ref.abs().max())).item()
        if not err <= tol:
            raise RuntimeError(f"merged model differs from the adapted one: relative logit error {err:.2e}")
    return model


def fold_factors(model: nn.Module) -> dict[str, float]:
    """The factor ``mupfast export`` folds into each adapted matrix (module path → factor)."""
    cfg = model.cfg
    q = float(model.blocks[0].attn.scale) * math.sqrt(cfg.head_dim)  # HF divides by √d_head
    out = {}
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        out.update({p + "attn.q": q, p + "attn.o": float(block.attn_branch_scale)})
        out[p + "mlp.down"] = float(block.mlp_branch_scale)
    return out


def _hf_module(layout: str, path: str) -> tuple[str, int]:
    """(HF module name, slot in a fused module) of one of our module paths."""
    _, i, sub, name = path.split(".")
    if layout == "llama":
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
        names.update({"o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj"})
        names["down"] = "mlp.down_proj"
        return f"model.layers.{i}.{names[name]}", 0
    fused = {"q": 0, "k": 1, "v": 2}
    if name in fused:
        return f"transformer.h.{i}.attn.c_attn", fused[name]
    names = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
    return f"transformer.h.{i}.{names[name]}", 0


@torch.no_grad()
def peft_tensors(model: nn.Module, layout: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module name → (A', B') of the adapters in PEFT LoRA form, export multipliers folded in."""
    modules = adapted_modules(model)
    _check_mergeable(modules)
    factors = fold_factors(model)
    parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = {}
    for path, m in modules.items():
        A, B = m.adapter.lora_factors()
        A, B = A.cpu(), B.cpu() * factors.get(path, 1.0)
        name, slot = _hf_module(layout, path)
        parts.setdefault(name, {})[slot] = (A, B, m.out_features)
    out = {}
    for name, slots in parts.items():
        if len(slots) == 1 and layout == "llama":
            A, B, _ = slots[0]
        else:  # GPT-2's c_attn: q, k, v side by side; c_proj, c_fc: one slot
            n_slots = 3 if name.endswith("c_attn") else 1
            width = next(iter(slots.values()))[2]
            A = torch.cat([slots[s][0] for s in sorted(slots)])
            B = torch.zeros(n_slots * width, A.shape[0], dtype=torch.float64)
            col = 0
            for s in sorted(slots):
                a, b, _ = slots[s]
                B[s * width : (s + 1) * width, col : col + a.shape[0]] = b
                col += a.shape[0]
        if A.shape[0] > 0:  # an AdaLoRA matrix whose every triplet was pruned has no adapter
            out[name] = (A, B)
    return out


def write_peft_adapter(model: nn.Module, layout: str, out_dir: Path, dtype: torch.dtype, base: str) -> dict:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA); returns the config."""
    from safetensors.torch import save_file

    pairs = peft_tensors(model, layout)
    if not pairs:
        raise ConfigError("finetune: the run has no adapter with a non-zero rank to write")
    tensors, ranks = {}, {}
    for name, (A, B) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
        ranks[name] = int(A.shape[0])
    r0 = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r0,
        "lora_alpha": r0,
        "target_modules": sorted(ranks),
        "rank_pattern": ranks,
        "alpha_pattern": ranks,  # α = r everywhere: PEFT's scale 1, ours is in B
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": layout == "gpt2",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
