"""The sweep report: every trial with its stability, the stable top k, and the picture.

The Cerebras μP guide's advice for picking proxy configurations: take the top ones by validation
loss, but look at the training dynamics too: a configuration with the lowest loss and a few loss
spikes or an exploding gradient norm loses to the second or third best one that trains smoothly.
:func:`report` is ``mupfast sweep --report``; :func:`format_best` the running table of a sweep.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mupfast.errors import ConfigError
from mupfast.rundir import metrics_path, read_metrics
from mupfast.tuning.stability import DEFAULT_THRESHOLDS, Thresholds, judge, run_stability

#: Short column names of the swept hyperparameters.
SHORT = {
    "lr": "lr",
    "init_std": "init_std",
    "embeddings_scale": "emb_scale",
    "output_logits_alpha": "out_alpha",
    "attention_logits_alpha": "attn_alpha",
}


@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    params: dict[str, float]
    stability: dict[str, Any] | None
    stable: bool
    why: str
    run_dir: str | None
    error: str | None
    last_intermediate: tuple[int, float] | None


def collect(study, th: Thresholds = DEFAULT_THRESHOLDS) -> list[TrialRow]:
    """Every trial with its stability (re-measured from its run directory where that exists)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        run_dir = t.user_attrs.get("run_dir")
        stab = t.user_attrs.get("stability")
        if run_dir and metrics_path(run_dir).is_file():
            stab = run_stability(read_metrics(run_dir), th)
        if t.state.name == "FAIL":
            stable, why = False, "failed: " + str(t.user_attrs.get("error", "unknown error"))
        elif stab is None:
            stable, why = False, "no stability record"
        else:
            stable, why = judge(stab, th)
        last = None
        if t.intermediate_values:
            step = max(t.intermediate_values)
            last = (step, t.intermediate_values[step])
        rows.append(
            TrialRow(
                t.number,
                t.state.name,
                t.value if t.state.name == "COMPLETE" else None,
                dict(t.params),
                stab,
                stable,
                why,
                run_dir,
                t.user_attrs.get("error"),
                last,
            )
        )
    return rows


def rank(rows: list[TrialRow], k: int) -> tuple[list[TrialRow], list[TrialRow]]:
    """(the top k stable complete trials by val loss, the unstable ones that beat the k-th of them)."""
    done = sorted((r for r in rows if r.state == "COMPLETE" and r.value is not None), key=lambda r: r.value)
    top = [r for r in done if r.stable][:k]
    bar = top[-1].value if len(top) == k else math.inf
    flagged = [r for r in done if not r.stable and r.value < bar]
    return top, flagged


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[TrialRow], names: list[str], ranked: bool = True) -> str:
    head = f"{'rank':>4} {'trial':>5} {'state':<8} {'val loss':>8}"
    head += "".join(f" {SHORT.get(n, n):>10}" for n in names)
    head += f" {'spikes':>6} {'gn ratio':>8} {'max|logit|':>10}  stability"
    lines = [head]
    for i, r in enumerate(rows, 1):
        s = r.stability or {}
        line = f"{i if ranked else '':>4} {r.number:>5} {r.state:<8} {_fmt(r.value, '.4f'):>8}"
        line += "".join(f" {_fmt(r.params.get(n)):>10}" for n in names)
        line += f" {_fmt(s.get('loss_spikes'), 'd'):>6} {_fmt(s.get('peak_grad_ratio'), '.2f'):>8}"
        line += (
            f" {_fmt(s.get('peak_abs_logit'), '.1f'):>10}  {'stable' if r.stable else r.why or 'unstable'}"
        )
        lines.append(line)
    return "\n".join(lines)


def space_names(study) -> list[str]:
    space = study.user_attrs.get("space") or {}
    names = list(space) or sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    return names


def format_best(study, k: int = 5) -> str:
    """The running table of the sweep: the best complete trials so far, from the storage alone."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE":
            continue
        stab = t.user_attrs.get("stability") or {}
        stable, why = judge(stab) if stab else (False, "no stability record")
        rows.append(
            TrialRow(t.number, "COMPLETE", t.value, dict(t.params), stab, stable, why, None, None, None)
        )
    rows = sorted(rows, key=lambda r: r.value)[:k]
    if not rows:
        return "best trials: none complete yet"
    return f"best {len(rows)} trials so far:\n" + table(rows, space_names(study))


def report(
    study, *, top_k: int = 10, th: Thresholds = DEFAULT_THRESHOLDS, plot_path: str | Path | None = None
) -> str:
    """The report of ``mupfast sweep --report``: all trials, the stable top k, the flagged ones."""
    if top_k <= 0:
        raise ConfigError(f"--top-k: must be positive (got {top_k})")
    rows = collect(study, th)
    names = space_names(study)
    top, flagged = rank(rows, top_k)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    proxy = (study.user_attrs.get("proxy_config") or {}).get("model", {})
    out = [
        f"study {study.study_name}: {len(rows)} trials ("
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + f"); proxy d={proxy.get('hidden_size')} d_ff={proxy.get('filter_size')} L={proxy.get('num_layers')}",
        f"stable = no non-finite step, no loss above {th.spike_factor:g}× its running median "
        f"(window {th.window}), grad norm within {th.max_grad_ratio:g}× its running median"
        + (f", max |logit| ≤ {th.max_abs_logit:g}" if th.max_abs_logit is not None else ""),
        "",
        "all trials by val loss:",
        table(
            sorted(rows, key=lambda r: (r.value is None, r.value if r.value is not None else 0, r.number)),
            names,
            ranked=False,
        ),
        "",
        f"top {len(top)} stable trials (the candidates to transfer):",
        table(top, names) if top else "  none",
    ]
    done = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    lowest = min(done, key=lambda r: r.value) if done else None
    for r in flagged:
        what = "lowest val loss" if r is lowest else f"val loss {r.value:.4f}, better than a selected trial,"
        out.append(
            f"! trial {r.number}: {what} but unstable ({r.why}); not selected — "
            "the guide prefers the next best configuration with stable training dynamics"
        )
    if plot_path is not None and rows:
        plot_report(rows, names, top, plot_path, study.study_name, study.user_attrs.get("space") or {})
        out.append(f"\nplot: {plot_path}")
    return "\n".join(out)


def plot_report(
    rows: list[TrialRow],
    names: list[str],
    top: list[TrialRow],
    path: str | Path,
    title: str = "",
    space: dict | None = None,
) -> Path:
    """Val loss against each hyperparameter; stable, unstable, pruned (last value) and failed trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from matplotlib.transforms import blended_transform_factory

    space = space or {}
    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    top_ids = {r.number for r in top}
    groups = [
        ("stable", "tab:blue", "o", [r for r in rows if r.state == "COMPLETE" and r.stable]),
        ("unstable", "tab:red", "^", [r for r in rows if r.state == "COMPLETE" and not r.stable]),
        ("pruned (last val)", "0.6", "s", [r for r in rows if r.state == "PRUNED" and r.last_intermediate]),
    ]
    failed = [r for r in rows if r.state == "FAIL" and r.params]
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        for label, color, marker, group in groups:
            xs = [r.params[name] for r in group if name in r.params]
            ys = [
                r.value if r.value is not None else r.last_intermediate[1] for r in group if name in r.params
            ]
            ax.scatter(xs, ys, c=color, marker=marker, s=28, label=label, alpha=0.85, zorder=3)
        best = [r for r in rows if r.number in top_ids and name in r.params]
        ax.scatter(
            [r.params[name] for r in best],
            [r.value for r in best],
            facecolors="none",
            edgecolors="k",
            s=90,
            linewidths=1.2,
            label="selected (top k stable)",
            zorder=4,
        )
        if failed:
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            xs = [r.params[name] for r in failed if name in r.params]
            ax.scatter(
                xs, [0.97] * len(xs), c="k", marker="x", s=30, transform=trans, label="failed", zorder=3
            )
        rng = space.get(name, {})
        if rng.get("log", True):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow ranges
        if "low" in rng and "high" in rng:  # the whole range: where in the space the trials landed
            pad = (rng["high"] / rng["low"]) ** 0.03 if rng.get("log", True) else 1.0
            ax.set_xlim(rng["low"] / pad, rng["high"] * pad)
        ax.set_xlabel(name)
        ax.grid(True, alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("val loss")
    for j in range(len(names), nrows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"sweep {title}: val loss per hyperparameter" if title else "val loss per hyperparameter")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The flags that pick a study and judge its trials (``sweep`` and ``transfer``)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="study name (default: the --config file's stem)")
    parser.add_argument(
        "--storage", help="sqlite:///path.db or postgresql://… (default sqlite:///runs/sweeps/<study>.db)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="trials to select (report: 10, transfer: 1)")
    parser.add_argument(
        "--spike-factor", type=float, default=1.2, help="loss spike: above this × running median"
    )
    parser.add_argument(
        "--max-grad-ratio", type=float, default=10.0, help="unstable above this grad-norm ratio"
    )
    parser.add_argument("--max-logit", type=float, default=None, help="unstable above this max |logit|")


def thresholds_from(args: argparse.Namespace) -> Thresholds:
    """The stability thresholds the study flags set."""
    return Thresholds(
        spike_factor=args.spike_factor, max_grad_ratio=args.max_grad_ratio, max_abs_logit=args.max_logit
    )
