"""``transfer-compare``'s table and picture: the three paths' target val loss and tuning FLOPs.

:func:`markdown` renders a result of :func:`mupfast.tuning.transfer_compare.transfer_compare.transfer_compare` as markdown
(the paths, every transferred config, the FLOPs ratio, the transfer gap, the verdicts);
:func:`plot_compare` draws target val loss against lr for SP's and μP's target grids (means as
lines, seeds as faint points), the transferred configs and μP's hand-set values as markers, and the
tuning FLOPs of each path as bars beside it.
"""

from __future__ import annotations

import math
from pathlib import Path


def _loss(e: dict | None) -> str:
    if e is None or e["val_loss"] is None or not math.isfinite(e["val_loss"]):
        return "diverged"
    std = f" ± {e['seed_std']:.4f}" if e.get("seed_std") is not None else ""
    return f"{e['val_loss']:.4f}{std}"


def _lr(lr: float) -> str:
    e = math.log2(lr)
    return f"2^{e:g}" if abs(e - round(e)) < 1e-9 else f"{lr:.3g}"


def _by_key(entries: list[dict], key: str | None) -> dict | None:
    return next((e for e in entries if e.get("key") == key), None)


def markdown(r: dict) -> str:
    """The result as markdown: one row per path, the transferred configs, the numbers, the verdicts."""
    p, t, f = r["proxy"], r["target"], r["flops"]
    mut = _by_key(r["mutransfer"]["configs"], r["mutransfer"]["best"])
    sp = _by_key(r["sp"]["grid"], r["sp"]["best"])
    hand = r["mup_hand_set"]
    grid = r["mup_lr_grid"]
    gbest = next((e for e in grid["grid"] if e["exponent"] == grid["best_exponent"]), None)
    n_trials, runs = f["proxy_trials"], f["target_runs"]
    reseeds = p.get("reseeds", 0)  # results written before --proxy-reseeds have none
    lines = [
        f"## μTransfer against SP tuned at the target: d={p['width']} proxy → d={t['width']} target "
        f"(L={t['num_layers']}, {t['steps']} steps × {t['tokens_per_step']:,} tokens, {t['seeds']} seed(s))",
        "",
        "| path | target val loss (mean ± seed std) | lr | tuning FLOPs | tuning runs |",
        "|---|---|---|---|---|",
        f"| μTransfer: best of the top {len(r['mutransfer']['configs'])} transferred"
        + (f" (trial {mut['trial']})" if mut else "")
        + f" | {_loss(mut)} | {_lr(mut['lr']) if mut else '—'} | {f['mutransfer']:.3e}"
        f" (proxy {f['proxy']:.3e} + target {f['validation']:.3e}) | {n_trials} proxy trials"
        + (f" + {len(p['reseeded']) * reseeds} proxy re-seed runs" if reseeds else "")
        + f" + {runs['validation']} target |",
        f"| SP tuned at the target ({len(r['sp']['grid'])} configs)"
        + (f", init std {sp['init_std']:g}" if sp else "")
        + f" | {_loss(sp)} | {_lr(sp['lr']) if sp else '—'}{' (grid edge)' if r['sp']['at_edge'] else ''}"
        f" | {f['sp']:.3e} | {runs['sp']} target |",
        f"| μP, the target config's hand-set values | {_loss(hand)} | {_lr(hand['lr'])} | 0 (untuned) | — |",
        f"| μP lr tuned at the target (transferred lr × 2^k, best k = "
        f"{grid['best_exponent'] if gbest else '—'}) | {_loss(gbest)} | {_lr(gbest['lr']) if gbest else '—'}"
        f"{' (grid edge)' if grid['at_edge'] else ''} | + {f['mup_lr_grid_extra']:.3e} on top of μTransfer"
        f" | + {runs['mup_lr_grid_extra']} target |",
        "",
        f"| transferred config | proxy val loss{f' (mean of {reseeds + 1} seeds)' if reseeds else ''} | target val loss | lr | init std | emb. scale | α_out | α_attn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in r["mutransfer"]["configs"]:
        cells = [
            e[k] for k in ("init_std", "embeddings_scale", "output_logits_alpha", "attention_logits_alpha")
        ]
        lines.append(
            f"| {e['key']} | {e['proxy_val_loss']:.4f} | {_loss(e)} | {e['lr']:.3g} | "
            + " | ".join(f"{c:.3g}" for c in cells)
            + " |"
        )
    gap = r["transfer_gap_pct"]
    lines += [
        "",
        f"- tuning FLOPs, μTransfer / SP: **{f['ratio']:.3f}** (FLOPs per token: proxy "
        f"{f['proxy_flops_per_token']:.4g}, target {f['target_flops_per_token']:.4g}; "
        f"{f['proxy_steps_trained']:,} proxy steps over {n_trials} trials)",
        "- transfer gap: the transferred lr's target val loss is "
        + ("— " if gap is None else f"**{gap:.3f}%** ")
        + f"above the best of μP's target lr grid ({len(grid['exponents'])} lrs around {grid['center_lr']:.3g})",
        "",
        *[f"- {v['line']}" for v in r["verdicts"]],
    ]
    if p["unstable_better"]:
        lines.append(
            f"- note: unstable proxy trials {p['unstable_better']} ranked above a selected one (not transferred)"
        )
    for ext in r.get("extensions", []):
        lines.append(
            f"- SP's grid widened by `--extend` ({ext['runs']} runs: {', '.join(ext['added']) or 'none'})"
        )
    if r["sp"]["at_edge"] or grid["at_edge"]:
        lines.append("- note: an optimum at the edge of its lr grid: the true optimum may lie outside it")
    return "\n".join(lines)


def _y_range(r: dict) -> tuple[float, float, float]:
    """(lowest, top of the chart, padding): a diverged or awful point does not squash the rest."""
    every = r["sp"]["grid"] + r["mup_lr_grid"]["grid"] + r["mutransfer"]["configs"] + [r["mup_hand_set"]]
    finite = [v for e in every for v in e["per_seed"] if v is not None and math.isfinite(v)]
    lo = min(finite) if finite else 0.0
    hi = min(max(finite) if finite else 1.0, lo + 1.5)
    pad = 0.05 * max(hi - lo, 1e-3)
    return lo, hi + pad, pad


def _loss_panel(ax, r: dict, plt) -> None:
    """Target val loss vs log2 lr: SP's and μP's grids as curves, transferred and hand-set as markers."""
    lo, top, pad = _y_range(r)

    def clip(v):
        return top if v is None or not math.isfinite(v) or v > top else v

    def curve(entries, color, label):
        entries = sorted(entries, key=lambda e: e["lr"])
        xs = [math.log2(e["lr"]) for e in entries]
        ax.plot(xs, [clip(e["val_loss"]) for e in entries], "-o", color=color, lw=1.6, ms=4, label=label)
        for x, e in zip(xs, entries):
            ax.scatter(
                [x] * len(e["per_seed"]), [clip(v) for v in e["per_seed"]], color=color, s=10, alpha=0.3
            )
            if not (e["val_loss"] is not None and math.isfinite(e["val_loss"]) and e["val_loss"] <= top):
                ax.plot(x, top, "x", color=color, ms=7, mew=1.5)

    stds = sorted({e["init_std"] for e in r["sp"]["grid"]})
    for i, std in enumerate(stds):
        label = "SP at the target" + (f", init std {std:g}" if len(stds) > 1 else "")
        curve(
            [e for e in r["sp"]["grid"] if e["init_std"] == std],
            plt.get_cmap("Reds")(0.5 + 0.4 * i / max(1, len(stds) - 1)),
            label,
        )
    curve(r["mup_lr_grid"]["grid"], "tab:blue", "μP lr at the target (transferred config, lr × 2^k)")
    for i, e in enumerate(r["mutransfer"]["configs"]):
        x, y = math.log2(e["lr"]), clip(e["val_loss"])
        label = "μTransferred (top k of the proxy)" if i == 0 else None
        ax.plot(x, y, "*", color="tab:green", ms=15, mec="k", mew=0.6, zorder=5, label=label)
        ax.annotate(e["key"].split("-")[0], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    h = r["mup_hand_set"]
    ax.plot(
        math.log2(h["lr"]), clip(h["val_loss"]), "D", color="k", ms=7, zorder=5, label="μP hand-set values"
    )
    ax.set_ylim(lo - pad, top + pad)
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel(f"target val loss after {r['target']['steps']} steps")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    t = r["target"]
    ax.set_title(
        f"target d={t['width']}, L={t['num_layers']}, {t['seeds']} seed(s) (faint: each seed; ×: diverged/off chart)",
        fontsize=9,
    )


def _flops_panel(bx, r: dict) -> None:
    """Tuning FLOPs of μTransfer (proxy sweep + target runs) and of SP's grid, as stacked bars."""
    f = r["flops"]
    exp = math.floor(math.log10(max(f["mutransfer"], f["sp"])))  # one scale in the label, no offset text
    u = 10.0**exp
    bx.bar(["μTransfer", "SP grid"], [f["proxy"] / u, 0.0], color="tab:olive", label="proxy sweep")
    bx.bar(
        ["μTransfer", "SP grid"],
        [f["validation"] / u, f["sp"] / u],
        bottom=[f["proxy"] / u, 0.0],
        color=["tab:green", "tab:red"],
        label="target runs",
    )
    bx.set_ylabel(f"tuning FLOPs (× 1e{exp})")
    bx.set_title(
        f"μTransfer / SP = {f['ratio']:.3f}\n(target ≤ {r['targets']['max_flops_ratio']:g})", fontsize=9
    )
    bx.legend(fontsize=7)
    bx.grid(axis="y", alpha=0.3, lw=0.5)


def plot_compare(r: dict, path: str | Path) -> None:
    """Target val loss vs log2 lr (SP and μP grids, transferred and hand-set markers) and FLOPs bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(10.5, 4.4), gridspec_kw={"width_ratios": [3, 1]}, layout="constrained"
    )
    _loss_panel(ax, r, plt)
    _flops_panel(bx, r)
    max_ratio, max_gap = r["targets"]["max_flops_ratio"], r["targets"]["max_transfer_gap_pct"]
    loss_flops, gap = r["verdicts"]
    word = {True: "PASS", False: "FAIL"}
    fig.suptitle(
        f"Does μTransfer pay?  best ≤ SP's at ≤ {max_ratio:g}× its FLOPs: {word[loss_flops['pass']]};  "
        f"transferred lr within {max_gap:g}% of the target's best: {word[gap['pass']]}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
