"""The time plan of benchmarks/gpu_check.sh: each part's budget, the Triton compiles it expects and their cost.

    python -m benchmarks.gpu_plan                 # the plan as a table (the dry run prints it)
    python -m benchmarks.gpu_plan --json          # the same as JSON
    python -m benchmarks.gpu_plan --budgets       # "part seconds" lines, what the script reads (no torch)
    python -m benchmarks.gpu_plan --smoke-tests   # the GPU smoke set's pytest node ids, one a line

A compile count is what the kernels' autotuners would try at the part's shapes on an H100/H200 (sm_90a): the
configs each pruner keeps per autotune key, plus one per plain kernel; an upper bound, since Triton's disk
cache serves a config compiled earlier in the run. Cost = compiles × COMPILE_S / the processes compiling at
once, plus TUNE_S per autotuned config benchmarked; torch.compile graphs (inductor) at INDUCTOR_S each.
Counting imports the kernels with ``TRITON_INTERPRET`` unset (the interpreter keeps one config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

TOTAL_S = 480  # the whole call: 8 minutes of the device tool's 10-minute command
COMPILE_S = 0.6  # one Triton compile on one core (issue #35: ~280 compiles of the attention matrix)
TUNE_S = 0.15  # the autotuner's benchmark of one compiled config (do_bench: 25 ms warmup + 100 ms)
INDUCTOR_S = 20.0  # one torch.compile graph (inductor, its kernels compiled in parallel): an estimate
GPU_CORES = 16
PYTEST_WORKERS = 8  # xdist workers: compiling is CPU-bound, 8 leave the others to the GPU's feeders

# (kind, dtype, shape): attention (D, T, causal, GQA group, documents), newton_schulz (M, K, precision),
# cross_entropy (V,), clip_adamw ().
Launch = tuple


def attn(dtype: str, D: int, T: int, causal: bool = True, group: int = 1, doc: bool = False) -> Launch:
    return ("attention", dtype, (D, T, causal, group, doc))


def ns(dtype: str, M: int, K: int, precision: str = "ieee") -> Launch:
    return ("newton_schulz", dtype, (M, K, precision))


def ce(dtype: str, V: int) -> Launch:
    return ("cross_entropy", dtype, (V,))


def adamw(dtype: str) -> Launch:
    return ("clip_adamw", dtype, ())


# The GPU smoke set: each kernel at its headline shapes in bf16 and fp32, forward and backward, with the
# launches each test makes (for the compile count). The full matrix stays `pytest -m gpu`.
ATTN = "tests/test_kernel_attention.py::"
SMOKE_TESTS: dict[str, list[Launch]] = {
    ATTN + "test_gpu_within_twice_the_error_of_sdpa[B2-Hq8-Hkv2-T1024-D128-bf16-causal]": [
        attn("bf16", 128, 1024, group=4)
    ],
    ATTN + "test_gpu_fp32_is_not_tf32[128]": [attn("fp32", 128, 777, group=2)],
    "tests/test_kernel_cross_entropy.py::test_bf16_matches_float64_reference[0.125-0.001-4096-512-50257]": [
        ce("bf16", 50257)
    ],
    "tests/test_kernel_cross_entropy.py::test_gpu_fp32_matches_float64_reference": [ce("fp32", 50257)],
    "tests/test_kernel_clip_adamw.py::test_gpu_large_step_matches_reference[pdtype0]": [adamw("fp32")],
    "tests/test_kernel_clip_adamw.py::test_gpu_large_step_matches_reference[pdtype1]": [adamw("bf16")],
    "tests/test_kernel_newton_schulz.py::test_gpu_bf16_syrk_matches_cublas_error[shape0]": [
        ns("bf16", 768, 3072)
    ],
    "tests/test_kernel_newton_schulz.py::"
    "test_gpu_bf16_newton_schulz_is_as_close_to_float64_as_the_torch_bf16_path[shape0]": [
        ns("bf16", 768, 3072)
    ],
    "tests/test_kernel_newton_schulz.py::test_gpu_fp32_newton_schulz_follows_torchs_tf32_setting": [
        ns("fp32", 512, 1536)
    ],
}


@dataclass
class Part:
    name: str
    budget_s: int
    what: str
    launches: list = field(default_factory=list)
    inductor_graphs: int = 0
    workers: int = 1  # processes compiling at once
    compiles: int = 0  # filled by plan()
    tuned: int = 0  # autotuned configs benchmarked
    triton_s: float = 0.0  # Triton compiles and tuning: the eager rows need them, so they must fit
    inductor_s: float = 0.0  # torch.compile peers: they run last, a part cut short loses them first


# 125m: d_head 64, T 2048, vocabulary 50304 (GPT-2's 50257 padded), bf16 weights with fp32 master copies.
E2E = [attn("bf16", 64, 2048), ce("bf16", 50304), adamw("fp32"), adamw("bf16")]
PARTS = [
    Part("setup", 25, "install .whl into /tmp/site, import check, nvidia-smi -q"),
    Part("pytest", 90, "the GPU smoke set (pytest-xdist), junit xml", workers=PYTEST_WORKERS),
    Part("e2e", 160, "bench_e2e 125m: fp32 ref, off/on eager, compile, then checkpointing", E2E, 8),
    Part(
        "attention",
        50,
        "bf16 d128 causal T 2k/8k, documents at 8k; FlexAttention last",
        [attn("bf16", 128, 2048), attn("bf16", 128, 8192), attn("bf16", 128, 8192, doc=True)],
        2,
    ),  # fmt: skip
    Part("cross_entropy", 35, "16k x 4096 x 128k bf16; torch.compile last", [ce("bf16", 131072)], 2),
    Part("clip_adamw", 20, "1.3B params, ours / torch fused / foreach / apex", [adamw("fp32")]),
    Part(
        "newton_schulz",
        35,
        "1.3B matrices bf16; torch.compile last",
        [ns("bf16", 2048, 2048), ns("bf16", 2048, 8192)],
        3,
    ),  # fmt: skip
    Part("moe_dispatch", 15, "one MoE layer at 16k tokens, loop vs grouped_mm"),
    Part("summary", 10, "summary .md/.json, tarball, copies to $OUT"),
]


def _attention_counts(dtype: str, shape: tuple) -> tuple[int, int]:
    """(compiles, tuned configs) of one attention forward + backward: the three autotuned kernels' kept
    configs on sm_90a, and the backward's preprocess kernel."""
    import torch

    from mupfast.kernels import attention as A
    from mupfast.kernels.runtime import TARGETS

    D, T, causal, group, doc = shape
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    q = torch.empty(1, group, T, D, dtype=dt, device="meta")
    meta = A._meta(q, q[:, :1], causal, doc)
    kept = 0
    for kernel in (A._attn_fwd, A._attn_bwd_dkdv, A._attn_bwd_dq):
        named = {"Q": q, "T": T, **meta}
        kept += len(kernel.early_config_prune(kernel.configs, named, target=TARGETS["sm_90a"], strict=True))
    return kept + 1, kept


def _newton_schulz_counts(dtype: str, shape: tuple) -> tuple[int, int]:
    """X·Xᵀ and the fused A·A + D: the syrk kernel's kept configs, once without D and once with it."""
    import torch

    from mupfast.kernels import newton_schulz as N
    from mupfast.kernels.runtime import TARGETS

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    p = torch.empty(1, *shape[:2], dtype=dt, device="meta")
    kernel = N._syrk_kernel
    kept = len(kernel.early_config_prune(kernel.configs, {"P": p}, target=TARGETS["sm_90a"], strict=True))
    return 2 * kept, 2 * kept


def counts(launches: list) -> tuple[int, int]:
    """(Triton compiles, autotuned configs benchmarked) of a list of launches, each distinct one once."""
    compiles = tuned = 0
    for kind, dtype, shape in dict.fromkeys(launches):
        if kind == "attention":
            c, t = _attention_counts(dtype, shape)
        elif kind == "newton_schulz":
            c, t = _newton_schulz_counts(dtype, shape)
        else:  # plain kernels: the fused readout's row kernel; clip + AdamW's norm, sum, coefficient, step
            c, t = (1 if kind == "cross_entropy" else 4), 0
        compiles, tuned = compiles + c, tuned + t
    return compiles, tuned


def plan() -> dict:
    """Every part with its budget, compile count and compile cost; the total of the budgets."""
    cost = lambda c, t: c * COMPILE_S + t * TUNE_S  # noqa: E731
    parts = []
    for p in PARTS:
        launches = [x for ls in SMOKE_TESTS.values() for x in ls] if p.name == "pytest" else p.launches
        p.compiles, p.tuned = counts(launches)
        p.triton_s = round(cost(p.compiles, p.tuned) / p.workers, 1)
        if p.name == "pytest":  # one test's autotuning is serial: the longest test bounds it from below
            p.triton_s = max(p.triton_s, max(round(cost(*counts(ls)), 1) for ls in SMOKE_TESTS.values()))
        p.inductor_s = p.inductor_graphs * INDUCTOR_S
        parts.append({k: v for k, v in asdict(p).items() if k != "launches"})
    total = sum(p["budget_s"] for p in parts)
    return {"total_s": total, "limit_s": TOTAL_S, "fits": total <= TOTAL_S, "parts": parts,
            "assumptions": {"compile_s": COMPILE_S, "tune_s": TUNE_S, "inductor_graph_s": INDUCTOR_S,
                            "target": "sm_90a (H100/H200)", "gpu_cores": GPU_CORES}}  # fmt: skip


def table(p: dict) -> str:
    head = ("part", "budget s", "compiles", "workers", "triton s", "graphs", "inductor s")
    lines = ["{:14s} {:>8s} {:>8s} {:>7s} {:>8s} {:>6s} {:>10s}  what".format(*head)]
    for r in p["parts"]:
        cut = "  (its compiled peers may be cut)" if r["triton_s"] + r["inductor_s"] > r["budget_s"] else ""
        lines.append(
            f"{r['name']:14s} {r['budget_s']:8d} {r['compiles']:8d} {r['workers']:7d} {r['triton_s']:8.1f} "
            f"{r['inductor_graphs']:6d} {r['inductor_s']:10.1f}  {r['what']}{cut}"
        )
    a = p["assumptions"]
    lines.append(
        f"{'total':14s} {p['total_s']:8d}  (limit {p['limit_s']} s: {'fits' if p['fits'] else 'DOES NOT FIT'}); "
        f"{a['compile_s']} s a Triton compile on one core, {a['tune_s']} s a tuned config, "
        f"{a['inductor_graph_s']} s an inductor graph; target {a['target']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="the plan as JSON")
    what.add_argument("--budgets", action="store_true", help="'part seconds' lines (imports no torch)")
    what.add_argument("--smoke-tests", action="store_true", help="the GPU smoke set's pytest node ids")
    a = ap.parse_args(argv)
    if a.budgets:
        print("\n".join(f"{p.name} {p.budget_s}" for p in PARTS))
        return 0
    if a.smoke_tests:
        print("\n".join(SMOKE_TESTS))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter's autotuners keep one config", file=sys.stderr)
        return 2
    p = plan()
    print(json.dumps(p, indent=1) if a.json else table(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
