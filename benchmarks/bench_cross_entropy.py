"""Fused μP readout, forward + backward: loss = CE(softmax(s · h Wᵀ)) + z · lse², grads of h and W.

mupfast's chunked Triton path against eager ``F.linear`` + ``F.cross_entropy`` (fp32 logits, the
usual upcast), the same function under ``torch.compile``, Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` (where importable; the scale is folded into h since Liger has
no logit multiplier, z-loss via ``lse_square_scale``), and the three bare GEMMs the fused path
has to do (a floor, materialising the logits). Each peer row carries ours/peer ratios of time and
peak memory, and the relative difference of its loss and grads from ours.

    python -m benchmarks.bench_cross_entropy                     # GPU: N=16k, d 2048/4096, V 32k/128k, bf16
    python -m benchmarks.bench_cross_entropy --headline          # GPU: N=16k, d 4096, V 128k only
    python -m benchmarks.bench_cross_entropy --smoke --out /tmp/x   # tiny fp32, CPU interpreter
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Recorder,
    bench_device,
    bench_parser,
    device_name,
    eager_then_compiled,
    error_line,
    measure,
    peak_memory_mb,
    selected_methods,
)

OURS = "mupfast fused (Triton)"
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ours(scale: float, z: float) -> Loss:
    from mupfast.kernels.cross_entropy import fused_linear_cross_entropy

    return lambda h, W, t: fused_linear_cross_entropy(h, W, t, logit_scale=scale, z_loss=z)


def eager(scale: float, z: float) -> Loss:
    def loss(h: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, W).float() * scale
        valid = t != -100
        lse = torch.logsumexp(logits, dim=-1)
        z_term = (lse.square() * valid).sum() / valid.sum().clamp_min(1)
        return F.cross_entropy(logits, t, ignore_index=-100) + z * z_term

    return loss


def compiled(scale: float, z: float) -> Loss:
    return torch.compile(eager(scale, z))


def liger(scale: float, z: float) -> Loss:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, lse_square_scale=z)

    def loss(h: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn(W, h * scale, t)
        return out[0] if isinstance(out, tuple) else out  # some versions also return the z-loss

    return loss


def gemm_floor(scale: float, z: float) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Only the three GEMMs (logits, dh, dW) — not a loss; a lower bound on the fused time."""

    def run(h: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = h @ W.t()
        return x[0, 0], x @ W, x.t() @ h

    return run


METHODS: dict[str, Callable[[float, float], Callable]] = {  # the compiled peer last: a cut run loses it first
    OURS: ours,
    "eager F.linear + F.cross_entropy (fp32 logits)": eager,
    "Liger LigerFusedLinearCrossEntropyLoss": liger,
    "3 bare GEMMs (floor, not a loss)": gemm_floor,
    "torch.compile(eager)": compiled,
}
COMPILED = ("torch.compile(eager)",)
SMOKE_METHODS = (OURS, "eager F.linear + F.cross_entropy (fp32 logits)")
HEADLINE = "16384x4096x131072"  # a Llama-3-sized readout: 16k tokens, d 4096, 128k vocabulary


def make_inputs(N: int, d: int, V: int, dtype: torch.dtype, device: torch.device, ignore_frac: float):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, W, t.to(device)


def step_fn(loss_fn: Callable, name: str, h: torch.Tensor, W: torch.Tensor, t: torch.Tensor):
    """One forward + backward; returns (loss, dh, dW)."""
    if name.startswith("3 bare GEMMs"):
        return lambda: loss_fn(h, W, t)

    def run():
        loss = loss_fn(h, W, t)
        return (loss, *torch.autograd.grad(loss, (h, W)))

    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure_method(name: str, args, inputs, warmup: int, reps: int, base: dict) -> dict:
    """One method's row at one shape; ``base`` holds ours (time, memory, outputs) once it is measured."""
    h, W, t = inputs
    (N, d), V = h.shape, W.shape[0]
    row = {"N": N, "d": d, "V": V, "dtype": str(h.dtype).removeprefix("torch."), "method": name}
    try:
        run = step_fn(METHODS[name](args.logit_scale, args.z_loss), name, h, W, t)
        out = run()  # also compiles
        tm = measure(run, warmup=warmup, reps=reps)
        mem = peak_memory_mb(run)
    except Exception as e:  # noqa: BLE001 - a peer that cannot build, run or fit is skipped
        return {**row, "status": f"skipped: {error_line(e)}"}
    tflops = 6 * N * d * V / (tm["median_ms"] * 1e-3) / 1e12
    row.update(median_ms=tm["median_ms"], min_ms=tm["min_ms"], max_ms=tm["max_ms"], gemm_TFLOPs=tflops)
    row["peak_extra_MB"] = mem
    if name == OURS:
        base |= {"ms": tm["median_ms"], "mb": mem, "out": [o.detach() for o in out]}
    elif base:
        row["ours_over_peer_time"] = base["ms"] / tm["median_ms"]
        row["ours_over_peer_mem"] = base["mb"] / mem if base["mb"] is not None and mem else None
        if not name.startswith("3 bare GEMMs"):
            row["rel_diff_loss"], row["rel_diff_dh"], row["rel_diff_dW"] = (
                rel(o, b) for o, b in zip(out, base["out"])
            )
    row["status"] = "ok"
    return row


def main(argv: list[str] | None = None) -> Path:
    ap = bench_parser(__doc__, warmup=3, reps=10, smoke="tiny fp32 shapes, CPU interpreter, ours + eager")
    ap.add_argument("--shapes", default="16384x2048x32768,16384x2048x131072,16384x4096x32768,16384x4096x131072",
                    help="comma-separated NxdxV")  # fmt: skip
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--logit-scale", type=float, default=0.125, help="μP output multiplier, e.g. α/m")
    ap.add_argument("--z-loss", type=float, default=1e-4)
    ap.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of targets set to -100")
    ap.add_argument("--headline", action="store_true", help=f"only the headline shape NxdxV = {HEADLINE}")
    ap.add_argument(
        "--methods", default="", help="comma-separated substrings selecting methods (default all)"
    )
    args = ap.parse_args(argv)
    device = bench_device()
    if args.smoke:
        shapes, dtype, (warmup, reps) = [(256, 64, 1000), (130, 32, 2048)], torch.float32, (1, 3)
    else:
        spec = HEADLINE if args.headline else args.shapes
        shapes = [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        warmup, reps = args.warmup, args.reps
    notes = (
        f"device {device_name(device)}; forward+backward (grads of h and W); logit_scale {args.logit_scale}, "
        f"z_loss {args.z_loss}, ignore_frac {args.ignore_frac}; gemm_TFLOPs credits 6·N·d·V FLOPs; "
        "ours_over_peer_* < 1 means ours is faster / smaller; peak_extra_MB is CUDA memory above the inputs; "
        "Liger gets h·scale as input (no logit multiplier of its own)"
    )
    rec = Recorder("cross_entropy", args, notes=notes, smoke="tiny fp32 shapes, Triton interpreter")
    names = selected_methods(METHODS, args.methods, SMOKE_METHODS if args.smoke else None)
    bases: dict[tuple, dict] = {shape: {} for shape in shapes}
    # Every shape's eager methods first, then the compiled peer: a time limit cuts the compiles first.
    for phase in eager_then_compiled(names, COMPILED):
        for N, d, V in shapes:
            inputs = make_inputs(N, d, V, dtype, device, args.ignore_frac)
            for name in phase:
                rec.add(measure_method(name, args, inputs, warmup, reps, bases[(N, d, V)]))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del inputs
    return rec.publish()


if __name__ == "__main__":
    main()
