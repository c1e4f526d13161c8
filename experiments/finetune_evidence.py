"""The CPU evidence of docs/finetune.md: full fine-tuning, LoRA, AdaLoRA and AdaMoLE on a held-out domain.

``python -m experiments.finetune_evidence --base runs/tiny --out docs/results/finetune`` fine-tunes the
demo model (``make demo``'s run: the first 8 MB of the standard library) on ``tkinter/``, a package
past that cap which pretraining never saw, with each method at a small lr grid. The adapters get an
equal trainable-parameter budget: LoRA rank 4 on every matrix; AdaLoRA from rank 6 down to an average
of 4 (the same final ranks); AdaMoLE 4 experts of rank 1 (the same expert parameters, plus gates).
Every run reports its val loss on the new domain and on the original validation split (forgetting).
Writes ``finetune.json``, ``finetune.md`` (the table) and ``docs/img/finetune.png``.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch

METHODS = {
    "full": (["finetune.method=full"], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]),
    "lora": (
        ["finetune.method=lora", "finetune.rank=4", "finetune.alpha=8"],
        [2e-3, 5e-3, 1.2e-2, 3e-2, 6e-2, 1.2e-1],
    ),
    "adalora": (
        [
            "finetune.method=adalora",
            "finetune.init_rank=6",
            "finetune.target_rank=4",
            "finetune.alpha=12",
            "finetune.tinit=20",
            "finetune.tfinal=40",
            "finetune.delta_t=10",
            "finetune.orth_reg_weight=0.1",
        ],
        [2e-3, 5e-3, 1.2e-2, 3e-2, 6e-2, 1.2e-1],
    ),
    "adamole": (
        ["finetune.method=adamole", "finetune.rank=1", "finetune.experts=4", "finetune.alpha=2"],
        [2e-3, 5e-3, 1.2e-2, 3e-2],
    ),
}
TARGETS = "finetune.target_components=[q, k, v, o, ffn_in, ffn_out]"


@torch.no_grad()
def val_loss(run_dir: Path, data_cfg, train_cfg, batches: int) -> float:
    """Mean loss of a run's model (base or fine-tuned) on the validation split of ``data_cfg``."""
    from mupfast.data import BatchSampler, prepare_sources
    from mupfast.export.load import load_run

    model = load_run(run_dir).model
    (src,) = prepare_sources(data_cfg, progress=False)
    t = train_cfg
    sampler = BatchSampler(
        [src.val_set()], seq_len=t.seq_len, micro_batch_size=t.micro_batch_size, seed=t.seed
    )
    losses = [model(x, y).item() for x, y in sampler.eval_batches(batches)]
    return sum(losses) / len(losses)


def trainable(run_dir: Path) -> int:
    from mupfast.export.load import load_run
    from mupfast.finetune.lora import ADAPTER_MARK

    run = load_run(run_dir)
    if run.cfg.finetune.method == "full":
        return sum(p.numel() for p in run.model.parameters())
    return sum(p.numel() for n, p in run.model.named_parameters() if ADAPTER_MARK in n)


def main(argv: list[str] | None = None) -> int:
    from mupfast.export.load import read_run_config
    from mupfast.finetune.finetune import finetune_config
    from mupfast.rundir import read_metrics
    from mupfast.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/tiny")
    p.add_argument("--out", default="docs/results/finetune")
    p.add_argument("--runs", default="runs/finetune-evidence")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base_cfg = read_run_config(args.base)
    domain = str(Path(sysconfig.get_paths()["stdlib"]) / "tkinter")
    common = [
        f"data.corpus={domain}",
        "data.val_fraction=0.2",
        f"train.steps={args.steps}",
        "train.eval_every=50",
        "train.eval_batches=8",
        "train.log_every=10",
        "train.micro_batch_size=16",
        "train.save_every=0",
        "train.progress=false",
        "schedule.kind=cosine",
        "schedule.warmup_steps=20",
        "optim.weight_decay=0.0",
        TARGETS,
    ]
    base_val = val_loss(Path(args.base), base_cfg.data, base_cfg.train, 16)
    probe = finetune_config(
        args.base, None, [*common, "finetune.method=full", f"train.run_dir={args.runs}/probe"]
    )
    base_domain = val_loss(Path(args.base), probe.data, probe.train, 8)
    rows = []
    for method, (over, lrs) in METHODS.items():
        for lr in lrs:
            run_dir = Path(args.runs) / f"{method}-lr{lr:g}"
            cfg = finetune_config(
                args.base, None, [*common, *over, f"optim.lr={lr}", f"train.run_dir={run_dir}"]
            )
            result = train(cfg)
            curve = {r["step"]: r["val_loss"] for r in read_metrics(run_dir, "eval")}
            row = {
                "method": method,
                "lr": lr,
                "trainable_params": trainable(run_dir),
                "domain_val_loss": result.val_losses[args.steps],
                "original_val_loss": val_loss(run_dir, base_cfg.data, base_cfg.train, 16),
                "domain_val_curve": curve,
            }
            print(json.dumps({k: v for k, v in row.items() if k != "domain_val_curve"}), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "base_run": args.base,
        "domain": "tkinter/ of the standard library (past the demo's 8 MB corpus cap)",
        "steps": args.steps,
        "base_original_val_loss": base_val,
        "base_domain_val_loss": base_domain,
        "runs": rows,
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    best = {
        m: min((r for r in rows if r["method"] == m), key=lambda r: r["domain_val_loss"]) for m in METHODS
    }
    lines = [
        f"| method | trainable params | best lr | domain val loss (base {base_domain:.3f}) | "
        f"original val loss (base {base_val:.3f}) | forgetting |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, r in best.items():
        lines.append(
            f"| {m} | {r['trainable_params']:,} | {r['lr']:g} | {r['domain_val_loss']:.3f} | "
            f"{r['original_val_loss']:.3f} | {r['original_val_loss'] - base_val:+.3f} |"
        )
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    _plot(best, rows, base_val, base_domain, Path("docs/img/finetune.png"))
    print("\n".join(lines))
    return 0


def _plot(best: dict, rows: list[dict], base_val: float, base_domain: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in best.items():
        steps = sorted(r["domain_val_curve"])
        a.plot(steps, [r["domain_val_curve"][s] for s in steps], marker="o", label=f"{m} (lr {r['lr']:g})")
    a.axhline(base_domain, color="grey", ls="--", lw=1, label="base model")
    a.set(
        xlabel="fine-tuning step",
        ylabel="val loss on the new domain (tkinter/)",
        title="learning the new domain",
    )
    a.legend()
    for m in best:
        mine = [r for r in rows if r["method"] == m]
        b.scatter([r["domain_val_loss"] for r in mine], [r["original_val_loss"] for r in mine], label=m, s=40)
    b.axhline(base_val, color="grey", ls="--", lw=1, label="base model")
    b.set(
        xlabel="domain val loss (lower: learnt more)",
        ylabel="original val loss (higher: forgot more)",
        title="learning vs forgetting (every lr)",
    )
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
