"""SqrtGate MoE layer, forward + backward: the per-expert loop (``moe_dispatch: loop``, one host sync
per layer for the token counts, three matmuls per expert) against torch's grouped_mm over the
stacked expert weights (``grouped``, no host sync, three grouped matmuls per layer).

The layer is one block's MoE from configs/moe-125m.yaml (d = 768, 64 experts of hidden 384, top 8,
a shared expert) on a micro-batch of tokens, bf16 on the GPU; ``--tokens`` sets the batch. The
router is made livelier than at init so the loads are uneven, as in training. ``speedup_vs_loop``
> 1 means grouped is faster; ``max_rel_diff`` compares the two outputs (same weights, same routing).
The model default stays ``loop`` until this benchmark, on a GPU, shows grouped faster.

    python -m benchmarks.bench_moe_dispatch                      # GPU
    python -m benchmarks.bench_moe_dispatch --headline           # GPU: the same single shape (gpu_check.sh)
    python -m benchmarks.bench_moe_dispatch --smoke --out /tmp/x  # tiny fp32 layer on the CPU
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import (
    Recorder,
    bench_device,
    bench_parser,
    device_name,
    error_line,
    measure,
    peak_memory_mb,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/moe-125m.yaml"
HEADLINE_TOKENS = 16384  # one micro-batch of 8 × 2048 tokens
SMOKE = [
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.filter_size=256",
    "model.mup_base_hidden_size=64",
]
SMOKE += [
    "model.mup_base_filter_size=256",
    "model.moe_experts=8",
    "model.moe_top_k=2",
    "model.moe_granularity=2",
]


def moe_layer(overrides: list[str], device: torch.device, dtype: torch.dtype):
    """The first block's MoE of the config, on ``device`` in ``dtype``, with a lively router."""
    from mupfast.config import load_config
    from mupfast.model import build_model

    cfg = load_config(str(ROOT / CONFIG), ["model.num_layers=1", *overrides])
    torch.manual_seed(0)
    moe = build_model(cfg.model).blocks[0].mlp.to(device=device, dtype=dtype)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
    return moe, cfg


def main(argv: list[str] | None = None) -> Path:
    ap = bench_parser(__doc__, warmup=5, reps=20, smoke="tiny fp32 layer on the CPU")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (default %(default)s)")
    ap.add_argument(
        "--headline", action="store_true", help="the headline shape: one layer at 16384 tokens (the default)"
    )
    args = ap.parse_args(argv)
    if args.headline:
        args.tokens = HEADLINE_TOKENS
    device = bench_device()
    if not args.smoke and device.type != "cuda":
        raise SystemExit("the full benchmark needs a CUDA GPU (use --smoke on CPU)")
    overrides, tokens = (SMOKE, 256) if args.smoke else ([], args.tokens)
    warmup, reps = (1, 2) if args.smoke else (args.warmup, args.reps)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    moe, cfg = moe_layer(overrides, device, dtype)
    m = cfg.model
    x = torch.randn(tokens, m.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def step():
        out = moe(x)
        out.float().square().mean().backward()
        return out

    notes = (
        f"device {device_name(device)}; one MoE layer of {CONFIG} (d={m.hidden_size}, {m.moe_experts} experts "
        f"of hidden {m.filter_size // m.moe_granularity}, top {m.moe_top_k}, shared expert "
        f"{m.moe_shared_expert}), forward + backward; speedup_vs_loop = loop ms / grouped ms"
    )
    rec = Recorder("moe_dispatch", args, notes=notes, smoke="tiny fp32 layer on the CPU")
    rows, outputs, base_ms = rec.rows, {}, None
    for dispatch in ("loop", "grouped"):
        moe.grouped = dispatch == "grouped"
        row = {"dispatch": dispatch, "tokens": tokens, "experts": m.moe_experts, "top_k": m.moe_top_k}
        row["dtype"] = str(dtype).replace("torch.", "")
        try:
            outputs[dispatch] = step().detach().float()
            t = measure(step, warmup=warmup, reps=reps)
            mem = peak_memory_mb(step)
        except Exception as e:  # noqa: BLE001 - a dispatch that cannot run here is recorded, not fatal
            rec.add({**row, "status": f"skipped: {error_line(e)}"})
            continue
        base_ms = t["median_ms"] if dispatch == "loop" else base_ms
        row.update(median_ms=t["median_ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], peak_extra_MB=mem)
        row.update(speedup_vs_loop=base_ms / t["median_ms"] if base_ms else None, status="ok")
        rec.add(row)
    if len(outputs) == 2:
        a, b = outputs["grouped"], outputs["loop"]
        for r in rows:
            r["max_rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
    return rec.publish()


if __name__ == "__main__":
    main()
