"""End to end: training tokens/s, TFLOP/s, MFU and peak memory of μP models, our kernels off and on
(SDPA + torch cross-entropy + torch AdamW against Triton), eager and ``torch.compile`` of each block,
activation checkpointing none and full; same config, same process, same device.

    python -m benchmarks.bench_e2e                          # GPU: 125M and 350M, all 8 variants, bf16
    python -m benchmarks.bench_e2e --models 125m --steps 30 --variants off-eager-none,on-compile-full
    python -m benchmarks.bench_e2e --smoke --out /tmp/x     # CPU: a tiny model, a few steps
    python -m benchmarks.bench_e2e --models 125m --variants gpu-check --ref-steps 10   # benchmarks/gpu_check.sh

A variant is ``KERNELS-EXEC-AC``: kernels ``off`` | ``on``; exec ``eager`` | ``compile``
(``train.compile``); AC ``none`` | ``full`` | ``selective`` | ``every_K`` (``train.activation_checkpointing``,
``train.checkpoint_every``). ``--variants`` takes a comma-separated list, ``all`` (the 8 of
off/on × eager/compile × none/full, the default on a GPU), ``gpu-check`` (those 8 after an fp32 reference, in
the order that answers the most first) or ``smoke`` (kernels off, eager, none and full: the default on the CPU).
A ``-fp32`` suffix trains in fp32 (``off-eager-none-fp32``: the reference; ``--ref-steps`` stops it early on the same schedule).

Each variant is a real run of the trainer (DeepSpeed engine, data, clip+AdamW, schedule) on the
byte-level embedded corpus with the target's vocabulary size, so the readout costs what it would.
Every variant records its loss at each logged step (``--log-every``, default 1: one host sync per step in
every variant) and the largest difference from the reference's (the fp32 run, else the base variant), so a
fast but wrong kernel cannot pass for a speed-up. Rows are written as each variant finishes.
Throughput is the median of the logging windows after the first (compilation and autotuning);
FLOPs per token and MFU come from ``mupfast.model.flops`` (6·N + 12·L·H·d_head·T, model FLOPs: the
recomputation of checkpointing is not credited), MFU against the device's nominal dense bf16 peak
and ``mfu_measured`` against a bf16 matmul timed in this process. ``speedup_vs_base`` and
``mem_vs_base`` compare each variant with kernels off, eager, no checkpointing of the same model.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import traceback
from pathlib import Path

import torch

from benchmarks.ceiling import probe
from benchmarks.common import Recorder, error_line
from mupfast.config import load_config
from mupfast.model.flops import flops_per_token, peak_bf16_tflops, throughput_metrics
from mupfast.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "on": ["model.attention_backend=triton", "model.readout_backend=triton", "optim.backend=triton"],
    "off": ["model.attention_backend=torch", "model.readout_backend=torch", "optim.backend=torch"],
}
EXEC = {"eager": ["train.compile=false"], "compile": ["train.compile=true"]}
BASE = "off-eager-none"
ALL_VARIANTS = [f"{k}-{e}-{a}" for k in ("off", "on") for e in ("eager", "compile") for a in ("none", "full")]
SMOKE_VARIANTS = ["off-eager-none", "off-eager-full"]
REF = "off-eager-none-fp32"  # the losses' reference: kernels off, eager, fp32
# What benchmarks/gpu_check.sh asks first: the reference, kernels off/on eager, then compiled, then checkpointing.
GPU_CHECK_VARIANTS = [REF, "off-eager-none", "on-eager-none", "on-compile-none", "off-compile-none"]
GPU_CHECK_VARIANTS += ["off-eager-full", "on-eager-full", "on-compile-full", "off-compile-full"]


def variant_overrides(name: str) -> list[str]:
    """The config overrides of a variant name ``KERNELS-EXEC-AC[-fp32]`` (module docstring)."""
    parts = name.split("-")
    fp32 = len(parts) == 4 and parts[3] == "fp32"
    if (
        len(parts) not in (3, 4)
        or parts[0] not in KERNELS
        or parts[1] not in EXEC
        or (len(parts) == 4 and not fp32)
    ):
        raise ValueError(f"variant {name!r}: expected KERNELS-EXEC-AC[-fp32], e.g. {BASE} or on-compile-full")
    kernels, exec_, ac = parts[:3]
    if ac in ("none", "full", "selective"):
        ac_keys = [f"train.activation_checkpointing={ac}"]
    elif ac.startswith("every_") and ac[6:].isdigit() and int(ac[6:]) >= 1:
        ac_keys = ["train.activation_checkpointing=every_k", f"train.checkpoint_every={ac[6:]}"]
    else:
        raise ValueError(f"variant {name!r}: AC must be none, full, selective or every_K (got {ac!r})")
    return [*KERNELS[kernels], *EXEC[exec_], *ac_keys, *(["train.precision=fp32"] if fp32 else [])]


def parse_variants(spec: str | None, gpu: bool) -> list[str]:
    """``all``, ``gpu-check``, ``smoke`` or a comma-separated list; None: all on a GPU, smoke elsewhere."""
    spec = spec or ("all" if gpu else "smoke")
    names = {"all": ALL_VARIANTS, "gpu-check": GPU_CHECK_VARIANTS, "smoke": SMOKE_VARIANTS}.get(spec) or [
        v.strip() for v in spec.split(",") if v.strip()
    ]
    for name in names:
        variant_overrides(name)  # fails early, naming the bad one
    return list(dict.fromkeys(names))


def run_variant(config: Path, overrides: list[str], work: Path) -> dict:
    """One training run; its median throughput and the figures mupfast.model.flops makes of it."""
    from mupfast.train import train

    cfg = load_config(config, [*overrides, f"train.run_dir={work}", "train.resume=false"])
    gc.collect()  # the previous variant's engine must not count towards this one's peak
    import torch._dynamo

    torch._dynamo.reset()  # nor its compiled graphs towards this one's recompilation limits
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    logged = read_metrics(work, "train")
    windows = [r["tokens_per_s"] for r in logged][1:] or [0.0]
    tok_s = statistics.median(windows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    m = throughput_metrics(tok_s, fpt, device)
    return {
        "tokens_per_s": tok_s,
        "flops_per_token": fpt,
        "tflops": m["tflops"],
        "mfu_nominal": m.get("mfu"),
        "peak_mem_GiB": m.get("peak_mem_GiB"),
        "windows": len(windows),
        "losses": {r["step"]: round(r["loss"], 6) for r in logged},
    }


def add_ratios(rows: list[dict], matmul_tflops: float) -> None:
    """MFU against the measured matmul, each model's variants against its base variant, and each one's
    losses against the reference's (REF where it ran, else the base) over the steps both logged."""
    for row in rows:
        if row["status"] != "ok":
            continue
        row["mfu_measured"] = row["tflops"] / matmul_tflops
        same = {r["variant"]: r for r in rows if r["model"] == row["model"] and r["status"] == "ok"}
        ref = same.get(REF) or same.get(BASE)
        if ref is not None:
            steps = sorted(set(ref["losses"]) & set(row["losses"]))
            row["loss_ref"], row["loss_steps_compared"] = ref["variant"], len(steps)
            diffs = [abs(row["losses"][k] - ref["losses"][k]) for k in steps]
            row["max_abs_loss_diff_vs_ref"] = max(diffs) if diffs else None
        base = same.get(BASE)
        if base is None:
            continue
        if base["tokens_per_s"]:
            row["speedup_vs_base"] = row["tokens_per_s"] / base["tokens_per_s"]
        if base["peak_mem_GiB"] and row["peak_mem_GiB"] is not None:
            row["mem_vs_base"] = row["peak_mem_GiB"] / base["peak_mem_GiB"]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every variant shares: short runs on the embedded corpus, no eval, no checkpoints."""
    common = [
        f"train.steps={4 if args.smoke else args.steps}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "train.save_final=false",
        "train.progress=false",
        "schedule.warmup_steps=1",
        "data.corpus=stdlib",  # the targets' corpus is the user's; the embedded one stands in
        "data.tokenizer=byte",
        "data.max_corpus_bytes=8000000",  # plenty of windows for 30 steps; prepared once, cached
        "zero.stage=1",
    ]
    if not args.smoke:
        common += [
            f"train.micro_batch_size={args.micro_batch}",
            f"train.seq_len={args.seq_len}",
            "train.grad_accum_steps=1",
            "train.precision=bf16",
        ]
    return common


def run_row(name: str, v: str, overrides: list[str], work: Path) -> dict:
    """One variant's row; a failure is recorded in it, not raised, so the others still run."""
    kernels, exec_, ac = v.split("-")[:3]
    row = {"model": name, "variant": v, "kernels": kernels, "exec": exec_, "ac": ac}
    try:
        row |= run_variant(ROOT / "configs" / f"{name}.yaml", overrides, work)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
        traceback.print_exc()
        row["status"] = f"failed: {error_line(e, 160)}"
    return row


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="125m,350m", help="config names under configs/")
    ap.add_argument(
        "--variants", default=None, help="all | gpu-check | smoke | comma-separated KERNELS-EXEC-AC[-fp32]"
    )
    ap.add_argument("--steps", type=int, default=30, help="training steps per variant")
    ap.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help=f"steps the reference {REF} runs of the --steps schedule (default all)",
    )
    ap.add_argument(
        "--log-every", type=int, default=1, help="steps between logged losses and throughput windows"
    )
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CPU: kernels off, eager)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    try:
        variants = parse_variants(args.variants, torch.cuda.is_available())
    except ValueError as e:
        ap.error(str(e))
    ceiling = probe()
    nominal = peak_bf16_tflops(ceiling["device"])
    models = ["tiny"] if args.smoke else args.models.split(",")
    common = common_overrides(args)
    notes = (
        f"ceiling today: {ceiling['matmul_tflops']:.4g} TFLOP/s {ceiling['matmul_dtype']} matmul, "
        f"{ceiling['copy_gbs']:.0f} GB/s copy; mfu_measured divides by the former"
        + (f", mfu_nominal by {nominal} TFLOP/s (nominal dense bf16)" if nominal else "")
        + f"; FLOPs per token from mupfast.model.flops (model FLOPs, recomputation not credited); base = {BASE}"
        + f"; losses every {args.log_every} step(s), max_abs_loss_diff_vs_ref against loss_ref ({REF} where it ran)"
    )
    rec = Recorder("e2e", args, notes=notes, smoke="CPU, not a measurement")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for v in variants:
                # the reference stops early on the same schedule (train.stop_at), so its losses compare
                steps = [f"train.stop_at={args.ref_steps}"] if v == REF and args.ref_steps else []
                row = run_row(name, v, [*common, *variant_overrides(v), *steps], Path(tmp) / f"{name}-{v}")
                rec.rows.append(row)
                add_ratios(rec.rows, ceiling["matmul_tflops"])
                rec.save()  # a run stopped from outside (a time limit) keeps every finished variant
                print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
    return rec.publish()


if __name__ == "__main__":
    main()
