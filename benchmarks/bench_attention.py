"""TFLOP/s of mup_attention against SDPA (flash and cuDNN backends) and flash_attn, same device, same run.

    python -m benchmarks.bench_attention                 # H100 sweep: bf16, d 64/128, T 1k–16k, causal and not
    python -m benchmarks.bench_attention --smoke --out /tmp/r   # CPU, Triton interpreter, tiny fp32 shapes

Shapes follow FlashAttention's plots: batch·T ≈ 16k tokens, hidden 2048, so heads = 2048 / d_head.
FLOPs: forward = 4·B·H·T²·D (halved when causal), forward+backward = 3.5 × forward. The scale is α/d_head
(μP); SDPA and flash_attn get the same float. Every row also records how far the peer's output is from ours.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import bench_parser, measure, peak_memory_mb, publish
from mupfast.kernels.attention import mup_attention

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


def _sdpa(backend_name: str) -> Attn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, scale, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)

    return run


def _flash_attn() -> Attn | None:
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - absent, or built against another torch/CUDA
        return None
    # flash_attn wants (B, T, H, D); the transposes are views, the kernel takes strided inputs.
    return lambda q, k, v, scale, causal: flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
    ).transpose(1, 2)


def providers(smoke: bool) -> dict[str, Attn]:
    """Ours first; peers that cannot be imported are left out (and named in the notes)."""
    found: dict[str, Attn] = {
        "mupfast": lambda q, k, v, scale, causal: mup_attention(q, k, v, scale=scale, causal=causal)
    }
    if smoke:
        found["sdpa-math"] = _sdpa("MATH")
        return found
    found["sdpa-flash"] = _sdpa("FLASH_ATTENTION")
    found["sdpa-cudnn"] = _sdpa("CUDNN_ATTENTION")
    fa = _flash_attn()
    if fa is not None:
        found["flash_attn"] = fa
    return found


def flops(batch: int, heads: int, seqlen: int, d_head: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * batch * heads * seqlen**2 * d_head / (2 if causal else 1)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _step(fn: Attn, q, k, v, do, scale: float, causal: bool, mode: str) -> Callable[[], object]:
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(q, k, v, scale, causal)

        return fwd
    return lambda: torch.autograd.grad(fn(q, k, v, scale, causal), (q, k, v), do)


def _inputs(batch: int, heads: int, seqlen: int, d_head: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(seqlen * 1000 + d_head)
    shape = (batch, heads, seqlen, d_head)
    q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _time(
    fn: Attn, q, k, v, do, scale: float, causal: bool, mode: str, args, reference: torch.Tensor
) -> dict:
    """Timing of one provider, and how far its output is from ours (a wrong peer call shows up here)."""
    with torch.no_grad():
        out = fn(q, k, v, scale, causal).float()
    step = _step(fn, q, k, v, do, scale, causal, mode)
    t = measure(step, warmup=args.warmup, reps=args.reps)
    row = {"rel_diff_vs_ours": ((out - reference).norm() / reference.norm()).item()}
    row |= {key: t[key] for key in ("median_ms", "min_ms", "max_ms")}
    if (mem := peak_memory_mb(step)) is not None:
        row["peak_mem_mb"] = mem
    return row


def run(args: argparse.Namespace) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    peers, rows = providers(args.smoke), []
    for d_head, seqlen, causal in itertools.product(args.d_heads, args.seqlens, args.causal):
        heads, batch = args.hidden // d_head, max(1, args.tokens // seqlen)
        q, k, v, do = _inputs(batch, heads, seqlen, d_head, getattr(torch, args.dtype), device)
        scale = args.alpha / d_head
        with torch.no_grad():
            ours_out = peers["mupfast"](q, k, v, scale, causal).float()
        for mode in args.modes:
            ours_ms = None
            for name, fn in peers.items():
                row = {"mode": mode, "causal": causal, "d_head": d_head, "seqlen": seqlen, "batch": batch}
                row |= {"heads": heads, "dtype": args.dtype, "provider": name}
                rows.append(row)
                try:
                    row |= _time(fn, q, k, v, do, scale, causal, mode, args, ours_out)
                except (RuntimeError, ValueError) as e:  # a backend that refuses this shape, or OOM
                    row["status"] = f"skipped: {str(e).splitlines()[0][:80]}"
                    print(
                        f"{mode:8s} causal={causal!s:5s} d={d_head:3d} T={seqlen:5d} {name:11s} {row['status']}"
                    )
                    continue
                ours_ms = row["median_ms"] if name == "mupfast" else ours_ms
                row["tflops"] = flops(batch, heads, seqlen, d_head, causal, mode) / row["median_ms"] / 1e9
                row["ours_speedup"] = row["median_ms"] / ours_ms if ours_ms else None
                row["status"] = "ok"
                print(
                    f"{mode:8s} causal={causal!s:5s} d={d_head:3d} T={seqlen:5d} {name:11s} "
                    f"{row['tflops']:8.2f} TFLOP/s {row['median_ms']:9.3f} ms  ours x{row['ours_speedup'] or 0:.2f}",
                    flush=True,
                )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, warmup=None, reps=None, smoke="CPU + Triton interpreter, tiny fp32 shapes (CI)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--d-heads", type=int, nargs="+", default=None)
    p.add_argument("--seqlens", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, default=None, help="batch·T per configuration")
    p.add_argument("--hidden", type=int, default=None, help="heads = hidden / d_head")
    p.add_argument(
        "--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[True, False]
    )
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--alpha", type=float, default=1.0, help="scale = alpha / d_head")
    args = p.parse_args(argv)
    full = dict(dtype="bfloat16", d_heads=[64, 128], seqlens=[1024, 2048, 4096, 8192, 16384], tokens=16384)
    smoke = dict(dtype="float32", d_heads=[32], seqlens=[40, 72], tokens=80)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.hidden = args.hidden or (64 if args.smoke else 2048)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 5)
    args.reps = args.reps or (2 if args.smoke else 20)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs under the Triton interpreter: set TRITON_INTERPRET=1 before starting")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the full benchmark needs a CUDA GPU (use --smoke on CPU)")
    rows = run(args)
    missing = [p for p in ("sdpa-flash", "sdpa-cudnn", "flash_attn") if p not in providers(args.smoke)]
    notes = (
        f"scale = {args.alpha}/d_head; batch·T ≈ {args.tokens}, heads = {args.hidden}/d_head; "
        "FLOPs fwd = 4·B·H·T²·D (/2 causal), fwd+bwd = 3.5×fwd; ours_speedup = peer ms / ours ms"
        + (f"; not available: {', '.join(missing)}" if missing and not args.smoke else "")
    )
    return publish("attention", rows, notes, args, smoke="CPU, Triton interpreter")


if __name__ == "__main__":
    main()
