"""Coordinate check: does every layer's output keep its size as the model gets wider?

For each parametrization and width, build the model the config describes at that width
(:func:`~mupfast.checks.scaling.scaled_config`), take a few steps of the real optimizer (the μP
groups, clipping off, one constant lr at every width) on the same fixed batches, and record mean
|x| and RMS of every layer's output — the embedding, each block's attention and MLP branch, the
final norm and the logits — at every step, as a geometric mean over seeds. The verdict of a layer
is the least-squares slope of log2(mean |x|) against log2(width): μP passes where |slope| ≤
``MUP_TOLERANCE`` at every t from ``JUDGED_FROM`` to ``steps`` (t counts updates). It measures the
parametrization, not the trainer: in-process, on the plain model and optimizer, without DeepSpeed.
What SP and μP show, and why the first steps are not judged: docs/seeing-mup-work.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mupfast.checks.coord_check_plot import plot_coord_check, verdict_lines
from mupfast.checks.results import write_result_files
from mupfast.checks.scaling import scaled_config
from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_int_list, parse_lr, parse_parametrizations, parse_positive_int

#: μP passes where the log2-log2 slope of every layer's mean |x| against width stays within this at
#: t = JUDGED_FROM..steps. 0.15 is 1.11× per doubling of the width (microsoft/mup's own test allows
#: 1.2× between widths). Measured with configs/coord-check.yaml, widths 64–1024, 3 seeds: μP's
#: largest slope is 0.13 (an MLP branch; seed noise of the large lr), SP's logits 0.6 and its hidden
#: branches 1.9–3.2. With fewer seeds or an arithmetic mean μP's MLP slopes reach ~0.2–0.25.
MUP_TOLERANCE = 0.15
#: First judged step. After one Adam step (t = 1) the learned part of the logits is still smaller
#: than their width^-½ init term at the smallest widths, so t = 1 shows μP's transient, not its limit.
JUDGED_FROM = 2
#: HyperP's η in the check: its relative step per update, near the transfer test's optimum (2^-2.5).
HYPERP_LR = 2**-3


# ----------------------------------------------------------------------------------------------
# Measurement


def layer_names(num_layers: int) -> list[str]:
    """The recorded layers, input to output."""
    names = ["embedding"]
    for i in range(num_layers):
        names += [f"block{i}.attn", f"block{i}.mlp"]
    return [*names, "final_norm", "logits"]


def _sizes(x: torch.Tensor) -> tuple[float, float]:
    x = x.detach().double()
    return x.abs().mean().item(), x.square().mean().sqrt().item()


def measure_run(cfg: Config, steps: int, seed: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Sizes of every layer's output at t = 0..steps for one model: {layer: {"mean_abs": [...], "rms": [...]}}."""
    from mupfast.model import build_model
    from mupfast.optim import build_optimizer

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    model.train()
    opt = build_optimizer(model, cfg)
    names = layer_names(cfg.model.num_layers)
    record: dict[str, dict[str, list[float]]] = {n: {"mean_abs": [], "rms": []} for n in names}
    record["loss"] = {"value": []}

    def keep(name: str, x: torch.Tensor) -> None:
        a, r = _sizes(x)
        record[name]["mean_abs"].append(a)
        record[name]["rms"].append(r)

    def final_norm_hook(_mod, _inp, out):
        keep("final_norm", out)
        with torch.no_grad():
            keep("logits", model.readout.logits(out))

    hooks = [
        model.tok_emb.register_forward_hook(
            lambda _m, _i, out: keep("embedding", out * model.embedding_scale)
        ),
        model.final_norm.register_forward_hook(final_norm_hook),
    ]
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_hook(lambda _m, _i, out, i=i: keep(f"block{i}.attn", out)))
        hooks.append(block.mlp.register_forward_hook(lambda _m, _i, out, i=i: keep(f"block{i}.mlp", out)))
    try:
        for t in range(steps + 1):
            x, y = batches[t]
            if t == steps:  # the last forward only measures
                with torch.no_grad():
                    record["loss"]["value"].append(model(x, y).item())
                break
            loss = model(x, y)
            record["loss"]["value"].append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return record


def _geomean(values: Sequence[float]) -> float:
    if any(not v > 0 for v in values):
        return 0.0 if all(v == 0 for v in values) else float("nan")
    return 2.0 ** (sum(math.log2(v) for v in values) / len(values))


def log2_slope(widths: Sequence[float], sizes: Sequence[float]) -> float:
    """Least-squares slope of log2(size) against log2(width); nan if a size is 0 or not finite."""
    if any(not (s > 0 and math.isfinite(s)) for s in sizes):
        return float("nan")
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(s) for s in sizes]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def scaled_configs(
    cfg: Config, widths: Sequence[int], parametrizations: Sequence[str], hyperp_lr: float
) -> dict[tuple[str, int], Config]:
    """(parametrization, width) → the config measured there: clipping off, one constant lr."""
    from mupfast.parametrization import hyperp_own_bases

    # clipping off and one constant lr (the optimizer's schedule at t = 0 is its own base lr)
    off = {"clip.max_norm": 0.0, "clip.global_max_norm": 0.0, "clip.component_max_norm": {}}
    base = with_overrides(cfg, {**off, "schedule.kind": "constant", "schedule.warmup_steps": 0})
    # hyperp's η comes from its rule: with the model's own bases it is hyperp_lr at every width.
    bases = {
        p: with_overrides(base, hyperp_own_bases(base, hyperp_lr)) if p == "hyperp" else base
        for p in parametrizations
    }
    return {
        (p, w): scaled_config(bases[p], parametrization=p, width=w, base_width=widths[0])
        for p in parametrizations
        for w in widths
    }


def fixed_batches(cfg: Config, steps: int, seeds: int, progress: bool) -> dict[int, list]:
    """seed → the batches of t = 0..steps, the same at every width."""
    from mupfast.data import BatchSampler, prepare_sources

    sources = prepare_sources(cfg.data, progress=progress)
    train_sets = [p.train_set() for p in sources]
    weights = [s.weight for s in cfg.data.sources] or None
    t = cfg.train
    return {
        s: [
            BatchSampler(
                train_sets,
                weights=weights,
                seq_len=t.seq_len,
                micro_batch_size=t.micro_batch_size,
                seed=t.seed + s,
            ).batch(k)
            for k in range(steps + 1)
        ]
        for s in range(seeds)
    }


def layer_entry(
    runs: dict[int, list[dict]], name: str, widths: list[int], steps: int, tolerance: float
) -> dict:
    """One layer of one parametrization: sizes and slopes per step, per-seed sizes, the verdict."""
    entry: dict[str, Any] = {}
    for metric in ("mean_abs", "rms"):
        # sizes[t][i]: geometric mean over seeds at step t, width widths[i]
        sizes = [
            [_geomean([run[name][metric][k] for run in runs[w]]) for w in widths] for k in range(steps + 1)
        ]
        entry[metric] = sizes
        entry[f"slope_{metric}"] = [log2_slope(widths, row) for row in sizes]
    # per_seed[s][t][i]: mean |x| of seed s, to see the spread behind the averages
    seeds = len(runs[widths[0]])
    entry["per_seed_mean_abs"] = [
        [[runs[w][s][name]["mean_abs"][k] for w in widths] for k in range(steps + 1)] for s in range(seeds)
    ]
    judged = [abs(s) for s in entry["slope_mean_abs"][min(JUDGED_FROM, steps) :]]
    entry["max_abs_slope"] = max(judged) if all(math.isfinite(s) for s in judged) else float("nan")
    entry["flat"] = bool(entry["max_abs_slope"] <= tolerance)
    return entry


def _verdicts(
    raw: dict, names: list[str], widths: list[int], steps: int, seeds: int, tolerance: float
) -> dict:
    """parametrization → its mean loss per step and width, every layer's entry, and whether all are flat."""
    out = {}
    for p, runs in raw.items():
        layers = {n: layer_entry(runs, n, widths, steps, tolerance) for n in names}
        out[p] = {
            # loss[t][i]: training loss of the forward at step t, width widths[i], mean over seeds
            "loss": [
                [sum(run["loss"]["value"][k] for run in runs[w]) / seeds for w in widths]
                for k in range(steps + 1)
            ],
            "layers": layers,
            "all_flat": all(e["flat"] for e in layers.values()),
        }
    return out


def coord_check(
    cfg: Config,
    widths: Sequence[int],
    *,
    steps: int = 5,
    seeds: int = 3,
    parametrizations: Sequence[str] = ("sp", "mup"),
    tolerance: float = MUP_TOLERANCE,
    progress: bool = True,
    hyperp_lr: float = HYPERP_LR,
) -> dict:
    """Run the coordinate check and return the result dict (what ``coord-check`` writes as JSON).

    Every parametrization trains at ``optim.lr`` except hyperp, whose η is ``hyperp_lr`` at every width.
    """
    from mupfast.progress import progress_bar

    if steps < 1 or seeds < 1:
        raise ConfigError(f"--steps and --seeds must be positive (got {steps}, {seeds})")
    widths = sorted(widths)
    configs = scaled_configs(cfg, widths, parametrizations, hyperp_lr)
    batches = fixed_batches(cfg, steps, seeds, progress)
    t = cfg.train
    start = time.perf_counter()
    raw: dict[str, dict[int, list[dict]]] = {p: {w: [] for w in widths} for p in parametrizations}
    jobs = [(p, w, s) for p in parametrizations for w in widths for s in range(seeds)]
    with progress_bar(len(jobs), desc="coord-check", unit="run", disable=not progress) as bar:
        for p, w, s in jobs:
            bar.set_postfix_str(f"{p} width {w} seed {s}")
            raw[p][w].append(measure_run(configs[p, w], steps, t.seed + s, batches[s]))
            bar.update(1)
    names = layer_names(cfg.model.num_layers)
    return {
        "widths": widths,
        "base_width": widths[0],
        "steps": steps,
        "seeds": seeds,
        "lr": cfg.optim.lr,
        "hyperp_lr": hyperp_lr if "hyperp" in parametrizations else None,
        "head_dim": cfg.model.head_dim,
        "num_layers": cfg.model.num_layers,
        "tokens_per_step": t.seq_len * t.micro_batch_size,
        "tolerance": tolerance,
        "judged_from": min(JUDGED_FROM, steps),
        "tolerance_note": (
            "μP passes where |slope of log2(mean |x|) vs log2(width)| <= tolerance for every layer at "
            f"every t = {min(JUDGED_FROM, steps)}..steps (t counts updates; earlier steps are reported, not judged)"
        ),
        "layers": names,
        "parametrizations": _verdicts(raw, names, widths, steps, seeds, tolerance),
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


# ----------------------------------------------------------------------------------------------
# Output files


def write_outputs(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``coord_check.json`` and ``coord_check.png`` into ``out``; return their paths."""
    return write_result_files(result, out, "coord_check", plot_coord_check)


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--widths", default="64,128,256,512,1024", help="comma-separated widths (default %(default)s)"
    )
    parser.add_argument("--steps", default="5", help="optimizer steps per width (default %(default)s)")
    parser.add_argument("--seeds", default="3", help="seeds averaged per width (default %(default)s)")
    parser.add_argument(
        "--parametrizations", default="sp,mup", help="sp, mup, completep, hyperp; default %(default)s"
    )
    parser.add_argument("--hyperp-lr", default="2^-3", help="hyperp's η at every width (default %(default)s)")
    parser.add_argument("--out", default="runs/coord-check", help="output directory (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """The ``coord-check`` verb: measure, print the verdicts, write the JSON and the picture."""
    result = coord_check(
        load_config(args.config, args.overrides),
        parse_int_list(args.widths, "--widths"),
        steps=parse_positive_int(args.steps, "--steps"),
        seeds=parse_positive_int(args.seeds, "--seeds"),
        parametrizations=parse_parametrizations(args.parametrizations),
        hyperp_lr=parse_lr(args.hyperp_lr, "--hyperp-lr"),
    )
    js, png = write_outputs(result, args.out)
    print("\n".join(verdict_lines(result)))
    print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
    return 0
