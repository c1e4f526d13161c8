"""Compile every kernel's launch configurations for a GPU target, without a GPU.

``python -m mupfast.kernels.targets --sample quick|full [--all-configs] [--json FILE]`` compiles each kernel
variant (dtype, head dim, GQA, document masking, ...) for sm_80 (A100) and sm_90a (H100/H200) with Triton's
bundled ptxas and reports, per configuration: dynamic shared memory (from the compiled kernel's metadata),
registers and spill bytes (from ptxas' own ``-v`` log), and how many vector global loads and stores the PTX
has.
Autotuned kernels get the configurations their pruner keeps for that target (``--all-configs``: every one).

The arguments are built the way the launchers build them (meta tensors stand for the tensors: the binder sees
16-byte-aligned pointers, strides divisible by 16 and ``GROUP == 1`` specialised, as at run time), so what
compiles here is what a GPU would compile. ``TRITON_INTERPRET`` must be unset: under the interpreter
``@triton.jit`` returns interpreter objects that cannot be compiled (the test runs this in a subprocess).
Each configuration compiles in a worker process; ``TRITON_CACHE_DIR`` should point at an empty folder, or
cached kernels skip ptxas and report no spills (``always_compile`` is forced anyway).

Another Triton compiles the same jobs when its package comes first on ``PYTHONPATH`` (this venv's torch is
only used for meta tensors): ``make preflight`` installs the GPU image's Triton into ``.preflight/`` and
runs the sample under it too; each result records the version that compiled it. Checked with 3.6 and 3.8.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import torch

from mupfast.kernels.runtime import TARGETS, Target

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Launch:
    """One kernel variant: the JIT function, its positional args, launch kwargs and candidate configs."""

    fn: object  # triton.runtime.jit.JITFunction
    args: list
    kwargs: dict
    configs: list  # triton.Config, after the kernel's pruning for the target (or all of them)
    note: dict = field(default_factory=dict)


@dataclass
class Result:
    kernel: str
    target: str
    variant: dict
    config: str
    sixteen_bit: bool  # 16-bit data: the configs that must not spill
    shared: int = 0
    smem_limit: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    vector_loads: int = 0  # 64/128-bit global loads in the PTX (ld.global.v2/.v4)
    vector_stores: int = 0
    error: str = ""
    kept: int = 0  # how many configs the pruner kept for this variant
    extra: dict = field(default_factory=dict)
    triton: str = ""  # the version that compiled it (another one first on PYTHONPATH: make preflight)


def _meta(dtype, *shape) -> torch.Tensor:
    return torch.empty(shape or (0,), dtype=dtype, device="meta")


def _configs(kernel, named_args: dict, kwargs: dict, target: Target, all_configs: bool) -> list:
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or all_configs:
        return configs
    return prune(configs, named_args, **kwargs, target=target, strict=True)  # strict: no fallback config


# ------------------------------------------------------------------------------------------- attention
def _attention(kind: str, v: dict, target: Target, all_configs: bool) -> Launch:
    from mupfast.kernels import attention as A

    dt, D, group, doc = _DT[v["dtype"]], v["D"], v["gqa"], v["doc"]
    B, Hkv, T = 2, 8, 4096
    H = Hkv * group
    q, k, lse = _meta(dt, B, H, T, D), _meta(dt, B, Hkv, T, D), _meta(torch.float32, B, H, T)
    ds = de = _meta(torch.int32, B, T) if doc else None
    strides = (*q.stride()[:3], *k.stride()[:3])
    meta = A._meta(q, k, True, doc)
    if kind == "preprocess":
        kwargs = {"HEAD_D": D, "BLOCK_D": meta["BLOCK_D"], "BLOCK_M": A.PREPROCESS_BLOCK_M}
        args = [q, q, lse, *q.stride()[:3], H, T]
        return Launch(A._bwd_preprocess, args, {**kwargs, **A.PREPROCESS_LAUNCH}, [None])
    kernel, args = {
        "fwd": (A._attn_fwd, [q, k, k, q, lse, ds, de, 0.125, *strides]),
        "dkdv": (A._attn_bwd_dkdv, [q, k, k, q, k, k, lse, lse, ds, de, 0.125, *strides]),
        "dq": (A._attn_bwd_dq, [q, k, k, q, q, lse, lse, ds, 0.125, *strides]),
    }[kind]
    named = dict(zip(kernel.fn.arg_names, args))
    return Launch(kernel.fn, args, {**meta, **A.LAUNCH}, _configs(kernel, named, meta, target, all_configs))


def _attention_variants(kind: str) -> list[dict]:
    grid = itertools.product(["bf16", "fp16", "fp32"], [64, 128, 256], [1, 4], [False, True])
    # fp16 compiles as bf16 does (same tiles, same registers): one head dim of it is enough; fp32 may spill
    # (it is for checks), so only its shared memory matters, which GQA does not change
    keep = lambda d, hd, g: (d != "fp16" or hd == 128) and (d != "fp32" or g == 4)  # noqa: E731
    out = [{"dtype": d, "D": hd, "gqa": g, "doc": doc} for d, hd, g, doc in grid if keep(d, hd, g)]
    if kind == "preprocess":  # no GQA, no documents: one variant per dtype and head dim
        out = [
            {**x, "gqa": 1} for x in out if not x["doc"] and x["gqa"] == (4 if x["dtype"] == "fp32" else 1)
        ]
    return out


# --------------------------------------------------------------------------------------- cross-entropy
def _cross_entropy(v: dict, target: Target, all_configs: bool) -> Launch:
    from mupfast.kernels import cross_entropy as ce

    dt, V, rows = _DT[v["dtype"]], v["V"], 4096
    stride = ce.padded_vocab(V)
    f32 = _meta(torch.float32, rows)
    block_r, block_v, warps = ce.row_blocks(V)
    t = _meta(torch.int64, rows)
    args = [_meta(dt, rows, stride), stride, t, f32, f32, f32, rows, V, 0.5, 1e-4, -100]  # as _rows_triton
    kwargs = {"WRITE_GRAD": v["grad"], "BLOCK_R": block_r, "BLOCK_V": block_v, "num_warps": warps}
    return Launch(ce._ce_rows_kernel, args, {**kwargs, **ce.LAUNCH}, [None])


def _cross_entropy_variants() -> list[dict]:
    grid = itertools.product(["bf16", "fp16", "fp32"], [1000, 50257], [False, True])
    return [{"dtype": d, "V": V, "grad": g} for d, V, g in grid]


# -------------------------------------------------------------------------------------- newton-schulz
def _newton_schulz(v: dict, target: Target, all_configs: bool) -> Launch:
    from mupfast.kernels import newton_schulz as ns

    dt, M, K = _DT[v["dtype"]], 1024, v["K"]
    p, c = _meta(dt, 1, M, K), _meta(dt, 1, M, M)
    args = [p, c, c, M, K, 1.0, 0.5, *p.stride(), *c.stride(), *c.stride()]  # D (read if HAS_D) and C
    kwargs = {"HAS_D": v["has_d"], "PRECISION": v["precision"]}
    kernel = ns._syrk_kernel
    named = dict(zip(kernel.fn.arg_names, args))
    configs = _configs(kernel, named, kwargs, target, all_configs)
    return Launch(kernel.fn, args, {**kwargs, **ns.LAUNCH}, configs)


def _newton_schulz_variants() -> list[dict]:
    out = []
    for dtype, has_d in itertools.product(["bf16", "fp16", "fp32"], [False, True]):
        for precision in ["ieee", "tf32"] if dtype == "fp32" else ["ieee"]:
            out.append({"dtype": dtype, "precision": precision, "K": 1024 if has_d else 4096, "has_d": has_d})
    return out


# ----------------------------------------------------------------------- clip + AdamW (launches as is)
def _by_name(fn, values: dict, note: dict) -> tuple[list, dict]:
    """Positional args and constexpr kwargs for ``fn`` from a table by parameter name. The clip + AdamW
    kernels are edited elsewhere: parameters the table lacks get a meta fp32 tensor (or False, for a
    constexpr), and are listed in ``note`` so the report shows the guess."""
    args, kwargs = [], {}
    for p in fn.params:
        value = values.get(p.name, False if p.is_constexpr else _meta(torch.float32, 64))
        if p.name not in values:
            note.setdefault("guessed", []).append(p.name)
        if p.is_constexpr:
            kwargs[p.name] = value
        else:
            args.append(value)
    return args, kwargs


def _clip_adamw(kind: str, v: dict, target: Target, all_configs: bool) -> Launch:
    import triton.language as tl

    from mupfast.kernels import clip_adamw as ca

    tld = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    i64, i32, f32 = _meta(torch.int64, 64), _meta(torch.int32, 64), _meta(torch.float32, 64)
    p = tld[v.get("dtype", "fp32")]
    vectors = ("partials", "out", "sq_ptr", "max_ptr", "out_ptr", "coef_ptr", "lr_ptr", "wd_ptr", "bc_ptr")
    values = {  # as the launchers in clip_adamw.py pass them
        "ptrs": i64, "numels": i64, "seg": i64, "groups": i32, "blk_tensor": i32, "blk_index": i32,
        "blk_slot": i32, "skip_ptr": i32, **dict.fromkeys(vectors, f32), "n_tensors": 12, "G": 12,
        "global_max": 1.0, "bc1": 0.9, "bc2_sqrt": 0.99, "beta1c": 0.1, "beta2": 0.99, "beta2c": 0.001,
        "eps": 1e-8, "G_DTYPE": p, "P_DTYPE": p, "M_DTYPE": tl.float32, "V_DTYPE": tl.float32, "ALIGNED": True,
        "BLOCK": ca.NORM_BLOCK if kind == "sq_partials" else ca.STEP_BLOCK, "RBLOCK": 1024,
        "USE_GLOBAL": True, "BLOCK_G": 16, **{k.upper(): b for k, b in v.items() if isinstance(b, bool)},
    }  # fmt: skip
    fn = {"sq_partials": ca._sq_partials_kernel, "group_sum": ca._group_sum_kernel, "coef": ca._coef_kernel,
          "step": ca._clip_adamw_kernel}[kind]  # fmt: skip
    note: dict = {}
    args, kwargs = _by_name(fn, values, note)
    warps = {"sq_partials": 8, "step": 8}.get(kind, 4)
    return Launch(fn, args, {**kwargs, "num_warps": warps}, [None], note)


def _clip_adamw_variants(kind: str) -> list[dict]:
    dtypes = ["bf16", "fp16", "fp32"]
    if kind == "step":
        flags = list(itertools.product([False, True], [False, True]))
        return [{"dtype": d, "bc_on_device": b, "skip_on_device": k} for d in dtypes for b, k in flags]
    return [{"dtype": d} for d in dtypes] if kind == "sq_partials" else [{"dtype": "fp32"}]


def _bind(builder, variants, kind: str) -> tuple:
    return (lambda v, t, a: builder(kind, v, t, a)), (lambda: variants(kind))


KERNELS = {  # name -> (launch builder (variant, target, all_configs), the variants of the full matrix)
    **{
        f"attention_{k}": _bind(_attention, _attention_variants, k)
        for k in ("fwd", "preprocess", "dkdv", "dq")
    },
    "cross_entropy_rows": (_cross_entropy, _cross_entropy_variants),
    "newton_schulz_syrk": (_newton_schulz, _newton_schulz_variants),
    **{
        f"clip_adamw_{k}": _bind(_clip_adamw, _clip_adamw_variants, k)
        for k in ("sq_partials", "group_sum", "coef", "step")
    },
}


# The default sample: the corners most likely to fail, every config kept there (25 compiles, about 70 s of
# compiling, so ~35 s on 2 cores): the backward at D = 128 with GQA and documents on sm_90a (the most
# registers; the workhorse shape), dQ and the forward at D = 256 on sm_80 (the most shared memory against the
# smallest limit, fp32 for dQ), the readout's rows at GPT-2's vocabulary, Newton–Schulz, clip + AdamW.
QUICK = [
    ("attention_fwd", "sm_80", {"dtype": "bf16", "D": 256, "gqa": 4, "doc": True}),
    ("attention_preprocess", "sm_90a", {"dtype": "bf16", "D": 256, "gqa": 1, "doc": False}),
    ("attention_dkdv", "sm_90a", {"dtype": "bf16", "D": 128, "gqa": 4, "doc": True}),
    ("attention_dq", "sm_80", {"dtype": "fp32", "D": 256, "gqa": 4, "doc": False}),
    ("attention_dq", "sm_90a", {"dtype": "bf16", "D": 128, "gqa": 4, "doc": True}),
    ("cross_entropy_rows", "sm_80", {"dtype": "bf16", "V": 50257, "grad": True}),
    ("cross_entropy_rows", "sm_90a", {"dtype": "bf16", "V": 50257, "grad": True}),
    ("newton_schulz_syrk", "sm_90a", {"dtype": "bf16", "precision": "ieee", "K": 4096, "has_d": False}),
    ("clip_adamw_sq_partials", "sm_90a", {"dtype": "bf16"}),
    ("clip_adamw_step", "sm_90a", {"dtype": "bf16", "bc_on_device": True, "skip_on_device": True}),
]


# --------------------------------------------------------------------------------------------- compile
_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _compile(job: tuple) -> Result:
    """Compile one (kernel, target, variant, config index) and read what ptxas and the metadata say."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    name, target_name, variant, index, all_configs = job
    target = TARGETS[target_name]
    t0 = time.time()
    launch = KERNELS[name][0](variant, target, all_configs)
    if index is None:  # the pruner kept nothing: the variant cannot launch on this target
        return Result(name, target_name, variant, "-", False, smem_limit=target.smem, error="no config kept")
    cfg = launch.configs[index]
    kwargs = {
        **launch.kwargs,
        **({k: v for k, v in cfg.all_kwargs().items() if v is not None} if cfg else {}),
    }
    sixteen = variant.get("dtype") in ("bf16", "fp16")
    res = Result(
        name, target_name, variant, str(cfg) if cfg else _plain(kwargs), sixteen, smem_limit=target.smem
    )
    res.kept, res.extra, res.triton = len(launch.configs), dict(launch.note), triton.__version__
    gpu = GPUTarget("cuda", target.capability, 32)
    backend = make_backend(gpu)
    fn = launch.fn
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        with contextlib.redirect_stdout(log):
            ck = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__
            )
    except Exception as e:  # a compile error is a finding, reported per config
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        return res
    text = log.getvalue()
    res.shared = int(ck.metadata.shared)
    if m := _PTXAS.search(text):
        res.spill_stores, res.spill_loads = int(m[1]), int(m[2])
    if m := _REGS.search(text):
        res.registers = int(m[1])
    res.vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ck.asm["ptx"]))
    res.vector_stores = len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ck.asm["ptx"]))
    res.extra["seconds"] = round(time.time() - t0, 2)
    return res


def _plain(kwargs: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in kwargs.items() if k.startswith("num_") or k.startswith("BLOCK"))


def _matches(v: dict, where: dict | None) -> bool:
    return not where or all(v.get(k, x[0] if x else None) in x for k, x in where.items() if k in v)


def jobs(sample: str, kernels=None, targets=None, all_configs: bool = False, where=None) -> list[tuple]:
    """(kernel, target, variant, config index, all_configs) for every config to compile."""
    if sample == "quick":
        todo = QUICK
    else:
        todo = [(n, t, v) for n, (_, variants) in KERNELS.items() for t in TARGETS for v in variants()]
    out = []
    for name, target_name, v in todo:
        if (
            (kernels and name not in kernels)
            or (targets and target_name not in targets)
            or not _matches(v, where)
        ):
            continue
        n = len(KERNELS[name][0](v, TARGETS[target_name], all_configs).configs)
        out += [(name, target_name, v, i, all_configs) for i in range(n)] or [
            (name, target_name, v, None, False)
        ]
    return out


def run(sample: str, kernels=None, targets=None, all_configs=False, workers=None, where=None, stream=None):
    """Compile the jobs in parallel; with ``stream`` (an open file) also write each result as a JSON line as
    soon as it is done. Returns the results in job order."""
    todo = jobs(sample, kernels, targets, all_configs, where)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        futures = [pool.submit(_compile, job) for job in todo]
        if stream is not None:
            for f in as_completed(futures):
                stream.write(json.dumps(asdict(f.result())) + "\n")
                stream.flush()
        return [f.result() for f in futures]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", choices=["quick", "full"], default="quick")
    ap.add_argument(
        "--kernels", default="", help="comma-separated names (default: all): " + ", ".join(KERNELS)
    )
    ap.add_argument("--targets", default="", help="comma-separated: " + ", ".join(TARGETS))
    ap.add_argument("--all-configs", action="store_true", help="ignore the pruners: compile every config")
    ap.add_argument(
        "--list", action="store_true", help="only list the jobs (kernel, target, variant, config)"
    )
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--where", default="", help='variant filter as JSON, e.g. {"dtype": ["bf16"], "D": [128]}'
    )
    ap.add_argument("--json", default="-", help="where to write the results (default stdout)")
    ap.add_argument("--jsonl", default="", help="also stream each result to this file as a JSON line")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    split = lambda s: [x for x in s.split(",") if x] or None
    where = json.loads(a.where) if a.where else None
    if a.list:  # what would compile: per variant and target, the configs its pruner keeps
        todo = jobs(a.sample, split(a.kernels), split(a.targets), a.all_configs, where)
        print(json.dumps([{"kernel": n, "target": t, "variant": v, "config": i} for n, t, v, i, _ in todo]))
        return 0
    with open(a.jsonl, "w") if a.jsonl else contextlib.nullcontext() as stream:
        results = run(a.sample, split(a.kernels), split(a.targets), a.all_configs, a.workers, where, stream)
    text = json.dumps([asdict(r) for r in results], indent=1)
    if a.json == "-":
        print(text)
    else:
        with open(a.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
