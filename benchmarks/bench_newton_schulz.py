"""Muon's Newton–Schulz orthogonalisation (5 quintic steps) on the hidden matrices of the 125M, 350M
and 1.3B configs: plain torch matmuls (the ``torch`` backend, bf16 iteration on GPU), the same
function under ``torch.compile``, and mupfast's Triton path (X·Xᵀ and A·A as symmetric matmuls that
compute only half of their tiles, b·A fused into the second; the third matmul is cuBLAS addmm).

Shapes come from configs/{125m,350m,1.3b}.yaml: d×d (q, k, v, o), d×filter (FFN gate/up; down is its
transpose, iterated on the same wide orientation), and a batch of the four d×d attention matrices of
a layer stacked (as batched Muon implementations run them). Inputs are fp32, as Muon's momentum.

TFLOP/s credits every method with the torch path's flops, 5·(4m²n + 2m³) per m×n matrix (m ≤ n), so
the symmetric kernel, which does m²n + m³ fewer per step, shows as a higher effective rate; it is
also given as a fraction of a dense bf16 matmul measured in the same run (``benchmarks.ceiling``).
``speedup_vs_torch`` > 1 means faster than plain torch. ``optim.newton_schulz_backend: auto`` keeps
torch until this benchmark, on a GPU, shows Triton faster on these shapes.

    python -m benchmarks.bench_newton_schulz                      # GPU
    python -m benchmarks.bench_newton_schulz --headline           # GPU: the 1.3B shapes only
    python -m benchmarks.bench_newton_schulz --smoke --out /tmp/x  # tiny fp32 shapes, CPU interpreter
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.ceiling import matmul_tflops
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

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"125M": "configs/125m.yaml", "350M": "configs/350m.yaml", "1.3B": "configs/1.3b.yaml"}
HEADLINE = "1.3B"  # d 2048, filter 8192: the largest matrices Muon orthogonalises here
SMOKE_DIMS = {"smoke": (40, 72)}  # d, filter: not multiples of the interpreter's 32-wide tiles
STEPS = 5
TORCH, COMPILED, OURS = "torch (plain matmuls)", "torch.compile(torch)", "mupfast Triton (symmetric)"
SMOKE_METHODS = (TORCH, OURS)  # inductor's CPU compile takes minutes on a shared 2-core machine


def model_dims(model: str) -> tuple[int, int]:
    from mupfast.config import load_config

    m = load_config(str(ROOT / MODELS[model])).model
    return m.hidden_size, m.filter_size


def shapes_for(d: int, f: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("q/k/v/o", (d, d)), ("ffn gate/up/down", (d, f)), ("attn of a layer, batched", (4, d, d))]


def torch_flops(shape: tuple[int, ...], steps: int = STEPS) -> int:
    """Flops of the plain torch iteration: per step X·Xᵀ (2m²n), A·A (2m³), B·X (2m²n)."""
    *batch, r, c = shape
    m, n = min(r, c), max(r, c)
    b = 1
    for k in batch:
        b *= k
    return b * steps * (4 * m * m * n + 2 * m**3)


def methods() -> dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]:
    from mupfast.kernels.newton_schulz import newton_schulz_reference, newton_schulz_triton

    return {  # the compiled one last: every shape's eager rows come before any inductor compile
        TORCH: lambda: newton_schulz_reference,
        OURS: lambda: newton_schulz_triton,
        COMPILED: lambda: torch.compile(newton_schulz_reference, dynamic=False),
    }


def time_method(fn: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, warmup: int, reps: int):
    """The output (first call: compiles / autotunes), the timing and the peak extra memory of fn(g)."""
    out = fn(g)
    return out, measure(lambda: fn(g), warmup=warmup, reps=reps), peak_memory_mb(lambda: fn(g))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure_method(name: str, case: dict, warmup: int, reps: int, ceiling: float) -> dict:
    """One method's row at one shape; ``case`` holds the input, its float64 result and torch's time."""
    row = {"model": case["model"], "matrices": case["what"], "shape": "x".join(map(str, case["g"].shape))}
    row |= {"method": name, "iter_dtype": case["iter_dtype"]}
    try:
        out, t, mem = time_method(methods()[name](), case["g"], warmup, reps)
    except Exception as e:  # noqa: BLE001 - a method that cannot build or run is skipped
        return {**row, "status": f"skipped: {error_line(e)}"}
    tflops = torch_flops(tuple(case["g"].shape)) / (t["median_ms"] * 1e-3) / 1e12
    if name == TORCH:
        case["base_ms"] = t["median_ms"]
    base_ms = case.get("base_ms")
    row.update(
        median_ms=t["median_ms"],
        min_ms=t["min_ms"],
        max_ms=t["max_ms"],
        effective_TFLOPs=tflops,
        frac_of_ceiling=tflops / ceiling,
        speedup_vs_torch=base_ms / t["median_ms"] if base_ms else None,
        rel_err_vs_fp64=rel(out, case["ref"]),
        peak_extra_MB=mem,
        status="ok",
    )
    return row


def main(argv: list[str] | None = None) -> Path:
    ap = bench_parser(__doc__, warmup=5, reps=20, smoke="tiny fp32 shapes, CPU interpreter, torch + ours")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--headline", action="store_true", help=f"only the headline model's shapes ({HEADLINE})")
    ap.add_argument(
        "--methods", default="", help="comma-separated substrings selecting methods (default all)"
    )
    args = ap.parse_args(argv)
    device = bench_device()
    if args.smoke:
        dims, (warmup, reps) = SMOKE_DIMS, (1, 2)
    else:
        if device.type != "cuda":
            raise SystemExit("the full benchmark needs a CUDA GPU (use --smoke on CPU)")
        models = [HEADLINE] if args.headline else args.models.split(",")
        dims, (warmup, reps) = {m: model_dims(m) for m in models}, (args.warmup, args.reps)
    gpu = device.type == "cuda"
    ceiling = matmul_tflops(device, 8192 if gpu else 256, torch.bfloat16 if gpu else torch.float32)
    iter_dtype = "bf16" if gpu else "fp32"
    notes = (
        f"device {device_name(device)}; ceiling: dense {'8192³ bf16' if gpu else '256³ fp32'} matmul "
        f"{ceiling:.4g} TFLOP/s in this run; {STEPS} NS steps, fp32 input, {iter_dtype} iteration; "
        "effective_TFLOPs credits every method with the torch path's 5·(4m²n + 2m³) flops (the symmetric "
        "kernel does m²n + m³ fewer per step); speedup_vs_torch = torch ms / method ms; rel_err_vs_fp64 "
        "against the same iteration in float64"
    )
    rec = Recorder("newton_schulz", args, notes=notes, smoke="tiny fp32 shapes, Triton interpreter")
    names = selected_methods(methods(), args.methods, SMOKE_METHODS if args.smoke else None)
    cases = []
    for model, (d, f) in dims.items():
        for what, shape in shapes_for(d, f):
            g = torch.randn(shape, device=device)
            ref = methods()[TORCH]()(g.double(), STEPS, torch.float64)
            cases.append({"model": model, "what": what, "g": g, "ref": ref, "iter_dtype": iter_dtype})
    # Every shape's eager methods first, then the compiled one: a time limit cuts the compiles first.
    for phase in eager_then_compiled(names, (COMPILED,)):
        for case in cases:
            for name in phase:
                rec.add(measure_method(name, case, warmup, reps, ceiling))
            if gpu:
                torch.cuda.empty_cache()
    return rec.publish()


if __name__ == "__main__":
    main()
