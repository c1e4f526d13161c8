"""TFLOP/s of mup_attention against SDPA (flash and cuDNN backends) and flash_attn, same device, same run.

    python -m benchmarks.bench_attention                 # H100 sweep: bf16, d 64/128, T 1k–16k, causal and not
    python -m benchmarks.bench_attention --headline      # GPU: the headline shapes only (benchmarks/gpu_check.sh)
    python -m benchmarks.bench_attention --smoke --out /tmp/r   # CPU, Triton interpreter, tiny fp32 shapes

Shapes follow FlashAttention's plots: batch·T ≈ 16k tokens, hidden 2048, so heads = 2048 / d_head.
FLOPs: forward = 4·B·H·T²·D (halved when causal), forward+backward = 3.5 × forward. The scale is α/d_head
(μP); SDPA and flash_attn get the same float. Every row also records how far the peer's output is from ours.

Packed documents (``--doc-lens``, rows with ``doc_len``): causal attention within documents of random
lengths around the mean (T = 8k, d_head 128 on a GPU), ours with ``doc_ids`` against FlexAttention with
a document BlockMask (compiled); TFLOP/s count only the within-document pairs (useful work), and
``tiles_skipped`` is the share of the causal key tiles our forward never loads. The smoke run's peer
is SDPA's math backend with the dense block-diagonal mask.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Recorder, bench_parser, measure, peak_memory_mb
from mupfast.kernels.attention import mup_attention

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
HEADLINE = "bf16, d_head 128, causal, T 2048 and 8192, packed documents of mean 1024 at T 8192"


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


def document_ids(batch: int, seqlen: int, mean_len: int, device) -> torch.Tensor:
    """(B, T) ids of documents with lengths uniform in [mean/2, 3·mean/2], cut at the row's end."""
    g = torch.Generator().manual_seed(mean_len * 7 + seqlen)
    rows = []
    for _ in range(batch):
        lens = []
        while sum(lens) < seqlen:
            lens.append(int(torch.randint(max(1, mean_len // 2), mean_len * 3 // 2 + 1, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:seqlen])
    return torch.stack(rows).to(device)


def useful_flops(doc_ids: torch.Tensor, heads: int, d_head: int, mode: str) -> float:
    """4·D FLOPs per (query, key) pair within a document, causal: Σ n(n+1)/2 pairs per document."""
    B, T = doc_ids.shape
    unique_across_rows = (doc_ids.cpu().long() + torch.arange(B)[:, None] * (T + 1)).flatten()
    n = torch.unique_consecutive(unique_across_rows, return_counts=True)[1].double()
    return 4.0 * heads * d_head * float((n * (n + 1) / 2).sum()) * (3.5 if mode == "fwd+bwd" else 1.0)


def doc_providers(smoke: bool, doc_ids: torch.Tensor) -> dict[str, Attn]:
    """Ours with doc_ids, and the peer: FlexAttention with a document BlockMask (GPU), SDPA math + dense mask."""
    found: dict[str, Attn] = {
        "mupfast": lambda q, k, v, scale, causal: mup_attention(
            q, k, v, scale=scale, causal=True, doc_ids=doc_ids
        )
    }
    if smoke:
        T = doc_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal
        found["sdpa-math"] = lambda q, k, v, scale, _: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale
        )
        return found
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return found

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    B, T = doc_ids.shape
    block_mask = create_block_mask(document_causal, B, None, T, T, device=doc_ids.device)
    flex = torch.compile(flex_attention)
    found["flex"] = lambda q, k, v, scale, causal: flex(q, k, v, block_mask=block_mask, scale=scale)
    return found


def _rows(rec: Recorder, peers: dict[str, Attn], inputs, scale: float, causal: bool, args, shape: dict, work,
          label: str, extra: dict | None = None) -> None:  # fmt: skip
    """One row per mode and provider, recorded as it is measured: its timing, TFLOP/s of ``work(mode)``
    FLOPs, and its speed and output against ours (the first provider)."""
    q, k, v, do = inputs
    with torch.no_grad():
        ours_out = peers["mupfast"](q, k, v, scale, causal).float()
    for mode in args.modes:
        ours_ms = None
        for name, fn in peers.items():
            row = {"mode": mode, "causal": causal, **shape, "provider": name, **(extra or {})}
            try:
                row |= _time(fn, q, k, v, do, scale, causal, mode, args, ours_out)
            except (RuntimeError, ValueError) as e:  # a backend that refuses this shape, or OOM
                row["status"] = f"skipped: {str(e).splitlines()[0][:80]}"
                print(f"{mode:8s} {label} {name:11s} {row['status']}")
                rec.add(row)
                continue
            ours_ms = row["median_ms"] if name == "mupfast" else ours_ms
            row["tflops"] = work(mode) / row["median_ms"] / 1e9
            row["ours_speedup"] = row["median_ms"] / ours_ms if ours_ms else None
            row["status"] = "ok"
            print(
                f"{mode:8s} {label} {name:11s} {row['tflops']:8.2f} TFLOP/s {row['median_ms']:9.3f} ms  "
                f"ours x{row['ours_speedup'] or 0:.2f}",
                flush=True,
            )
            rec.add(row)


def run_documents(args: argparse.Namespace, rec: Recorder) -> None:
    """The packed-document rows: ours with doc_ids against the peer at each mean document length; the peer
    is compiled (FlexAttention), so these run after every eager row."""
    from mupfast.kernels.attention import skipped_tiles

    device = "cpu" if args.smoke else "cuda"
    d_head, seqlen = args.doc_d_head, args.doc_seqlen
    heads, batch = args.hidden // d_head, max(1, args.tokens // seqlen)
    shape = {"d_head": d_head, "seqlen": seqlen, "batch": batch, "heads": heads, "dtype": args.dtype}
    for mean_len in args.doc_lens:
        inputs = _inputs(batch, heads, seqlen, d_head, getattr(torch, args.dtype), device)
        doc_ids = document_ids(batch, seqlen, mean_len, device)
        skipped, total = skipped_tiles(doc_ids, 64, 64)
        extra = {"doc_len": mean_len, "tiles_skipped": skipped / total}
        label = f"docs~{mean_len:5d} T={seqlen:5d} (tiles skipped {skipped}/{total})"
        work = lambda mode, doc_ids=doc_ids: useful_flops(doc_ids, heads, d_head, mode)
        peers = doc_providers(args.smoke, doc_ids)
        _rows(rec, peers, inputs, args.alpha / d_head, True, args, shape, work, label, extra)


def run(args: argparse.Namespace, rec: Recorder) -> None:
    device = "cpu" if args.smoke else "cuda"
    peers = providers(args.smoke)
    for d_head, seqlen, causal in itertools.product(args.d_heads, args.seqlens, args.causal):
        heads, batch = args.hidden // d_head, max(1, args.tokens // seqlen)
        inputs = _inputs(batch, heads, seqlen, d_head, getattr(torch, args.dtype), device)
        shape = {"d_head": d_head, "seqlen": seqlen, "batch": batch, "heads": heads, "dtype": args.dtype}
        work = lambda mode, b=batch, h=heads, t=seqlen, d=d_head, c=causal: flops(b, h, t, d, c, mode)
        label = f"causal={causal!s:5s} d={d_head:3d} T={seqlen:5d}"
        _rows(rec, peers, inputs, args.alpha / d_head, causal, args, shape, work, label)


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
    p.add_argument(
        "--doc-lens", type=int, nargs="*", default=None, help="mean document lengths (packed rows)"
    )
    p.add_argument("--doc-seqlen", type=int, default=None, help="T of the packed rows")
    p.add_argument("--doc-d-head", type=int, default=None, help="d_head of the packed rows")
    p.add_argument("--headline", action="store_true", help=f"only the headline shapes: {HEADLINE}")
    args = p.parse_args(argv)
    full = dict(dtype="bfloat16", d_heads=[64, 128], seqlens=[1024, 2048, 4096, 8192, 16384], tokens=16384)
    full |= dict(doc_lens=[512, 1024, 4096], doc_seqlen=8192, doc_d_head=128)
    if args.headline and not args.smoke:
        full |= dict(d_heads=[128], seqlens=[2048, 8192], doc_lens=[1024])
        args.causal = [True] if args.causal == [True, False] else args.causal
    smoke = dict(dtype="float32", d_heads=[32], seqlens=[40, 72], tokens=80)
    smoke |= dict(doc_lens=[16], doc_seqlen=160, doc_d_head=32)
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
    rec = Recorder("attention", args, smoke="CPU, Triton interpreter")
    run(args, rec)
    run_documents(args, rec)
    missing = [p for p in ("sdpa-flash", "sdpa-cudnn", "flash_attn") if p not in providers(args.smoke)]
    notes = (
        f"scale = {args.alpha}/d_head; batch·T ≈ {args.tokens}, heads = {args.hidden}/d_head; "
        "FLOPs fwd = 4·B·H·T²·D (/2 causal), fwd+bwd = 3.5×fwd; ours_speedup = peer ms / ours ms"
        + (f"; not available: {', '.join(missing)}" if missing and not args.smoke else "")
    )
    return rec.publish(notes)


if __name__ == "__main__":
    main()
