"""End to end: training tokens/s, MFU and peak memory of μP models with our kernels on against off
(SDPA + torch cross-entropy + torch AdamW), same config, same process, same device.

    python -m benchmarks.bench_e2e                      # GPU: 125M and 350M, ZeRO-1, bf16
    python -m benchmarks.bench_e2e --smoke --out /tmp/x # CPU: a tiny model, a few steps

Each variant is a real run of the trainer (DeepSpeed engine, data, clip+AdamW, schedule) on the
byte-level embedded corpus with the target's vocabulary size, so the readout costs what it would.
Throughput is the median of the logging windows after the first (compilation and autotuning).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.ceiling import probe
from benchmarks.common import publish
from mupfast.config import load_config
from mupfast.metrics import read_metrics
from mupfast.train import train

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "on": ["model.attention_backend=triton", "model.readout_backend=triton", "optim.backend=triton"],
    "off": ["model.attention_backend=torch", "model.readout_backend=torch", "optim.backend=torch"],
}
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def flops_per_token(cfg) -> float:
    """6·N for the matmuls (embedding lookup excluded) + 12·L·d·T for attention (fwd+bwd)."""
    m = cfg.model
    d, f, L, T = m.hidden_size, m.filter_size, m.num_layers, cfg.train.seq_len
    kv = m.kv_heads * m.head_dim
    per_layer = d * d * 2 + 2 * d * kv + (3 if m.mlp == "swiglu" else 2) * d * f
    n_matmul = L * per_layer + m.vocab_size * d
    return 6 * n_matmul + 12 * L * d * T


def run_variant(config: Path, overrides: list[str], work: Path) -> dict:
    cfg = load_config(config, [*overrides, f"train.run_dir={work}", "train.resume=false"])
    gc.collect()  # the previous variant's engine must not count towards this one's peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    windows = [r["tokens_per_s"] for r in read_metrics(work, "train")][1:] or [0.0]
    tok_s = statistics.median(windows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"tokens_per_s": tok_s, "tflops": tok_s * flops_per_token(cfg) / 1e12, "peak_mem_GiB": peak}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="125m,350m", help="config names under configs/")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps, kernels off only")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    ceiling = probe()
    gpu = torch.cuda.is_available()
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in ceiling["device"]), None)
    models = ["tiny"] if args.smoke else args.models.split(",")
    common = [
        f"train.steps={4 if args.smoke else args.steps}",
        "train.log_every=1" if args.smoke else "train.log_every=5",
        "train.eval_every=0",
        "train.save_every=0",
        "train.progress=false",
        "schedule.warmup_steps=1",
        "data.corpus=stdlib",  # the targets' corpus is the user's; the embedded one stands in
        "data.tokenizer=byte",
        "zero.stage=1",
    ]
    if not args.smoke:
        common += [
            f"train.micro_batch_size={args.micro_batch}",
            f"train.seq_len={args.seq_len}",
            "train.grad_accum_steps=1",
            "train.precision=bf16",
        ]
    variants = {"off": KERNELS["off"]} if (args.smoke and not gpu) else KERNELS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            config = ROOT / "configs" / f"{name}.yaml"
            results = {
                k: run_variant(config, [*common, *v], Path(tmp) / f"{name}-{k}") for k, v in variants.items()
            }
            for k, r in results.items():
                row = {
                    "model": name,
                    "kernels": k,
                    **r,
                    "mfu_measured": r["tflops"] / ceiling["matmul_tflops"],
                }
                if nominal:
                    row["mfu_nominal"] = r["tflops"] / nominal
                if "on" in results and "off" in results:
                    row["speedup_vs_off"] = r["tokens_per_s"] / results["off"]["tokens_per_s"]
                rows.append(row)
    notes = (
        f"ceiling today: {ceiling['matmul_tflops']:.1f} TFLOP/s {ceiling['matmul_dtype']} matmul, "
        f"{ceiling['copy_gbs']:.0f} GB/s copy; mfu_measured divides by the former"
        + (f", mfu_nominal by {nominal} TFLOP/s" if nominal else "")
    )
    return publish("e2e", rows, notes, args, smoke="CPU, not a measurement")


if __name__ == "__main__":
    main()
