"""Model FLOPs per token, nominal accelerator peaks, and the throughput figures built from them.

One count shared by the trainer's logging and ``benchmarks/bench_e2e.py``, so an MFU printed by a
run and one in a benchmark table mean the same thing.

Convention (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token =

    6·N + 12·L·H·d_head·T

- N: the matmul parameters one token passes through: per block W_q, W_k, W_v, W_o (W_k and W_v at
  the kv width, so GQA costs less), the MLP (gate, up and down for SwiGLU; up and down for GELU) or,
  in a mixture-of-experts block, the router plus the top-k routed experts and the shared expert
  (only the experts a token is sent to, not all E); and the readout (V·d, also when it is tied to
  the embedding: the matmul is done either way). The embedding and position-table lookups are
  excluded (gathers, not matmuls); so are biases, norms, RoPE, activations, softmax and the loss,
  each O(d) per token against O(d²) for the matmuls. 6 = 2 (a multiply-add) × 3 (forward, and the
  two backward matmuls: activation and weight gradients).
- 12·L·H·d_head·T: QKᵀ and PV, forward and backward, for L layers of H query heads at sequence
  length T. This is the non-causal count: a causal kernel that skips the masked half does about
  half of it, but MFU is quoted against this count (PaLM, Megatron), so figures compare across
  papers. It does not depend on the kv heads (every query head does its own QKᵀ and PV).

These are model FLOPs, not hardware FLOPs: recomputation (activation checkpointing, a readout that
recomputes its logit chunks in the backward) is not counted, so checkpointing lowers MFU.
"""

from __future__ import annotations

import re

import torch

from mupfast.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks from the vendor datasheets, TFLOP/s. Matched against
# ``torch.cuda.get_device_name()`` in order; the first pattern that matches wins, so the specific
# variants come before the generic names. A value of None marks a part known to differ from the
# generic entry whose figure is not in this table (better no MFU than a wrong one).
NOMINAL_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),  # "NVIDIA H100 PCIe"
    (r"\bH100\b.*\bNVL\b", None),  # "NVIDIA H100 NVL": another clock and power limit
    (r"\bH100\b", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", None),
    (r"\bH200\b", 989.4),  # "NVIDIA H200" (SXM): the H100's chip with more memory
    (r"\bA100\b", 312.0),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB": the same peak
    (r"\bGB200\b", None),  # "B200" inside "GB200" must not match the B200 entry
    (r"\bB200\b", 2250.0),  # "NVIDIA B200"
)


def _block_is_moe(cfg: ModelConfig, i: int) -> bool:
    """Block i holds a mixture of experts (the same rule as mupfast.model.Transformer)."""
    return cfg.moe_experts > 0 and (i + 1) % cfg.moe_every == 0


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """N: weights of the matmuls one token goes through (module docstring); biases excluded."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attention = d * cfg.num_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o; k, v
    ffn_mats = 3 if cfg.mlp == "swiglu" else 2
    dense = ffn_mats * d * cfg.filter_size
    n = 0
    for i in range(cfg.num_layers):
        n += attention
        if _block_is_moe(cfg, i):
            expert = ffn_mats * d * (cfg.filter_size // cfg.moe_granularity)
            active = cfg.moe_top_k + (1 if cfg.moe_shared_expert else 0)
            n += d * cfg.moe_experts + active * expert  # router, then the experts the token visits
        else:
            n += dense
    return n + cfg.vocab_size * d  # the readout


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """12·L·H·d_head·T: QKᵀ and PV forward and backward, non-causal count (module docstring)."""
    return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6·N + 12·L·H·d_head·T (PaLM appendix B).

    N counts the matmul parameters a token passes through: attention at the kv width, SwiGLU or
    GELU MLP, in MoE blocks the router and only the top-k (+ shared) experts, and the readout
    (tied or not); the embedding lookup and biases are excluded. The attention term is the
    non-causal count (a causal kernel does about half). Recomputation is not counted.
    """
    return 6.0 * matmul_params_per_token(model_cfg) + attention_flops_per_token(model_cfg, seq_len)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Nominal dense bf16 peak (TFLOP/s) of a device named as ``torch.cuda.get_device_name()``
    names it ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", …); None if unknown."""
    for pattern, peak in NOMINAL_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def throughput_metrics(tokens_per_s: float, flops_per_token: float, device: torch.device) -> dict:
    """What a throughput means on ``device``: {"tflops"} always; "mfu" (against the nominal bf16
    peak) where the device's peak is known; "peak_mem_GiB" (torch.cuda.max_memory_allocated) on CUDA.

    MFU is achieved model FLOP/s over the nominal peak, whatever precision the run used.
    """
    device = torch.device(device)
    tflops = tokens_per_s * flops_per_token / 1e12
    out: dict[str, float] = {"tflops": tflops}
    if device.type == "cuda":
        peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
        if peak:
            out["mfu"] = tflops / peak
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
