"""Optimizer step time, per-group gradient clipping + AdamW: mupfast's fused Triton kernels against
torch AdamW (fused / foreach), DeepSpeed FusedAdam and apex FusedAdam, each with the same per-group
``clip_grad_norm_`` done by torch. Parameter sets are shaped like a 125M and a 1.3B GPT (fp32
params and grads, 10 groups by component) and bandwidth is compared with a device-to-device copy
timed in the same run.

    python -m benchmarks.bench_clip_adamw                  # GPU: 125M and 1.3B
    python -m benchmarks.bench_clip_adamw --headline       # GPU: the 1.3B parameter set only
    python -m benchmarks.bench_clip_adamw --smoke --out /tmp/x   # tiny shapes, CPU interpreter
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.ceiling import copy_bandwidth_gbs
from benchmarks.common import (
    Recorder,
    bench_device,
    bench_parser,
    device_name,
    error_line,
    measure,
    peak_memory_mb,
    selected_methods,
)

COMPONENTS = ["emb", "q", "k", "v", "o", "ffn_gate", "ffn_up", "ffn_down", "norm_attn", "norm_ffn"]
LR_MULT = {"emb": 1.0, "norm_attn": 1.0, "norm_ffn": 1.0}  # hidden matrices get 1/m (μP-like)
MODELS = {  # tied embeddings, SwiGLU FFN
    "125M": dict(d=768, layers=12, vocab=50304, ffn=2048),
    "1.3B": dict(d=2048, layers=24, vocab=50304, ffn=5504),
    "smoke": dict(d=32, layers=2, vocab=256, ffn=64),
}
HEADLINE = "1.3B"
BETAS, EPS, LR, WD = (0.9, 0.95), 1e-8, 1e-3, 0.1
# Bytes per fp32 parameter that must move: read p, m, v, g and write p, m, v (28), plus the norm
# pass reading g once more (4). Every method is credited with these 32 B, whatever it really moves.
BYTES_PER_PARAM = 32


def gpt_shapes(d: int, layers: int, vocab: int, ffn: int) -> list[tuple[str, tuple[int, ...]]]:
    """(component, shape) for every tensor of a pre-norm GPT with SwiGLU and tied embeddings."""
    out = [("emb", (vocab, d))]
    for _ in range(layers):
        out += [("norm_attn", (d,)), ("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d))]
        out += [("norm_ffn", (d,)), ("ffn_gate", (ffn, d)), ("ffn_up", (ffn, d)), ("ffn_down", (d, ffn))]
    return out + [("norm_ffn", (d,))]  # final norm


class Problem:
    """Params, grads and per-group hyperparameters shared by every method."""

    def __init__(self, model: str, device: torch.device):
        cfg = MODELS[model]
        shapes = gpt_shapes(**cfg)
        self.group_ids = [COMPONENTS.index(c) for c, _ in shapes]
        self.params = [torch.randn(s, device=device) * 0.02 for _, s in shapes]
        self.grads = [torch.randn(s, device=device) * 1e-3 for _, s in shapes]
        width = cfg["d"] / 256
        self.lrs = [LR * LR_MULT.get(c, 1 / width) for c in COMPONENTS]
        self.wds = [0.0 if c.startswith("norm") else WD for c in COMPONENTS]
        # Limits far above the norms: every method does the full clipping work (norms, coefficient,
        # scaling) while the grads keep their values from one repetition to the next.
        self.max_norms = [1e6] * len(COMPONENTS)
        self.numel = sum(p.numel() for p in self.params)
        self.device = device

    def groups(self) -> list[list[torch.Tensor]]:
        return [[p for p, g in zip(self.params, self.group_ids) if g == k] for k in range(len(COMPONENTS))]


def ours(pb: Problem) -> Callable[[], None]:
    from mupfast.kernels.clip_adamw import clip_adamw_step, clip_coefficients, group_sq_norms

    ms = [torch.zeros_like(p) for p in pb.params]
    vs = [torch.zeros_like(p) for p in pb.params]
    vec = lambda xs: torch.tensor(xs, dtype=torch.float32, device=pb.device)
    max_norms, lrs, wds, G = vec(pb.max_norms), vec(pb.lrs), vec(pb.wds), len(COMPONENTS)
    step = [0]

    def run() -> None:
        step[0] += 1
        coef = clip_coefficients(group_sq_norms(pb.grads, pb.group_ids, G), max_norms)
        clip_adamw_step(
            pb.params,
            pb.grads,
            ms,
            vs,
            pb.group_ids,
            coef=coef,
            lrs=lrs,
            weight_decays=wds,
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
            step=step[0],
        )

    return run


def torch_clip_then(make_opt: Callable[[list[dict]], torch.optim.Optimizer]):
    """A peer: per-group torch ``clip_grad_norm_`` (foreach), then ``make_opt``'s step."""

    def build(pb: Problem) -> Callable[[], None]:
        groups = pb.groups()
        for p, g in zip(pb.params, pb.grads):
            p.grad = g
        param_groups = [
            {"params": ps, "lr": lr, "weight_decay": wd} for ps, lr, wd in zip(groups, pb.lrs, pb.wds)
        ]
        opt = make_opt(param_groups)

        def run() -> None:
            for ps, mx in zip(groups, pb.max_norms):
                torch.nn.utils.clip_grad_norm_(ps, mx, foreach=True)
            opt.step()

        return run

    return build


def deepspeed_fused_adam(groups: list[dict]) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise RuntimeError("needs CUDA (a CUDA multi-tensor kernel)")
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, betas=BETAS, eps=EPS, adam_w_mode=True)


def apex_fused_adam(groups: list[dict]) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise RuntimeError("needs CUDA (a CUDA multi-tensor kernel)")
    from apex.optimizers import FusedAdam  # NVIDIA apex, not the PyPI project of that name

    return FusedAdam(groups, betas=BETAS, eps=EPS, adam_w_mode=True)


METHODS = {
    "mupfast fused clip+AdamW (Triton)": ours,
    "torch AdamW(fused=True) + clip_grad_norm_": torch_clip_then(
        lambda g: torch.optim.AdamW(g, betas=BETAS, eps=EPS, fused=True)
    ),
    "torch AdamW(foreach=True) + clip_grad_norm_": torch_clip_then(
        lambda g: torch.optim.AdamW(g, betas=BETAS, eps=EPS, foreach=True)
    ),
    "DeepSpeed FusedAdam + clip_grad_norm_": torch_clip_then(deepspeed_fused_adam),
    "apex FusedAdam + clip_grad_norm_": torch_clip_then(apex_fused_adam),
}


def check_agreement(device: torch.device) -> float:
    """Largest relative difference, ours vs torch AdamW(foreach=False), after one clipped step."""
    pbs = []
    for _ in range(2):
        torch.manual_seed(0)
        pbs.append(Problem("smoke", device))
        pbs[-1].max_norms = [0.01] * len(COMPONENTS)  # every group clipped
    ours(pbs[0])()
    torch_clip_then(lambda g: torch.optim.AdamW(g, betas=BETAS, eps=EPS, foreach=False))(pbs[1])()
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(pbs[0].params, pbs[1].params))


def main(argv: list[str] | None = None) -> Path:
    ap = bench_parser(__doc__, warmup=5, reps=20, smoke="tiny shapes, CPU interpreter, few reps")
    ap.add_argument("--models", default="125M,1.3B", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--headline", action="store_true", help=f"only the headline model ({HEADLINE})")
    ap.add_argument(
        "--methods", default="", help="comma-separated substrings selecting methods (default all)"
    )
    args = ap.parse_args(argv)
    device = bench_device()
    models = ["smoke"] if args.smoke else [HEADLINE] if args.headline else args.models.split(",")
    warmup, reps = (1, 3) if args.smoke else (args.warmup, args.reps)
    copy_numel = 1 << (16 if args.smoke else 28)  # 1 GiB of fp32 on GPU
    copy_gbs = copy_bandwidth_gbs(device, copy_numel, warmup, reps)
    agreement = check_agreement(device)
    notes = (
        f"device {device_name(device)}; copy bandwidth {copy_gbs:.4g} GB/s ({copy_numel * 4 / 2**20:g} MiB fp32 "
        f"copy, read+write); effective_GBps credits every method with {BYTES_PER_PARAM} B/param "
        "(read p,m,v,g + write p,m,v + norm read of g); per-group clip_grad_norm_(foreach=True) for peers; "
        f"max rel diff ours vs torch AdamW(foreach=False) after one clipped step: {agreement:.2e}"
    )
    rec = Recorder("clip_adamw", args, notes=notes)
    for model in models:
        base_ms = None
        for name in selected_methods(METHODS, args.methods):
            build = METHODS[name]
            pb = Problem(model, device)
            row = {"model": model, "params_M": round(pb.numel / 1e6, 3), "method": name}
            try:
                run = build(pb)
                t = measure(run, warmup=warmup, reps=reps)
            except Exception as e:  # noqa: BLE001 - a peer that cannot build or run is skipped
                rec.add({**row, "status": f"skipped: {error_line(e)}"})
                continue
            gbs = BYTES_PER_PARAM * pb.numel / (t["median_ms"] * 1e-3) / 1e9
            if build is ours:
                base_ms = t["median_ms"]
            row.update(
                median_ms=t["median_ms"],
                min_ms=t["min_ms"],
                max_ms=t["max_ms"],
                effective_GBps=gbs,
                frac_of_copy_bw=gbs / copy_gbs,
                time_vs_ours=t["median_ms"] / base_ms if base_ms else None,
                peak_extra_MB=peak_memory_mb(run),
                status="ok",
            )
            rec.add(row)
            del run, pb
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rec.publish()


if __name__ == "__main__":
    main()
