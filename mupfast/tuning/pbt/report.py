"""The PBT report: the lineage of the best member, a table of generations, and two pictures.

``mupfast pbt --report --study NAME`` (also written at the end of every run) writes into
``runs/pbt/<study>/report/``:

* ``val-loss.png``: every member's val loss at the end of each generation, exploit events marked
  (a line from the copied member down or up to its source at that step; failures as crosses);
* ``lineage.png``: each hyperparameter along the final best member's lineage (traced back through
  the member each segment took its weights from), member switches marked;
* ``generations.md``: per generation the best and median val loss, exploits, crashes, non-finites;
* ``lineage.json``: the lineage, its lr schedule and the piecewise multipliers
  ``mupfast transfer --pbt`` writes for the target.

Everything comes from the study database; the member directories are not needed.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from mupfast.errors import ConfigError
from mupfast.tuning.pbt.schema import Segment
from mupfast.tuning.pbt.store import PbtStore
from mupfast.tuning.sweep.report import SHORT


def lineage(store: PbtStore) -> dict[str, Any]:
    """The best member of the last generation that has results, traced back to generation 0."""
    row = store.study_row()
    if row is None:
        raise ConfigError(f"--study {store.study}: no PBT study of that name in the storage")
    st = row["settings"]
    segs = store.segments()
    by_key = {(s.member, s.generation): s for s in segs}
    done = [
        g
        for g in sorted({s.generation for s in segs})
        if any(s.generation == g and s.status == "ok" for s in segs)
    ]
    if not done:
        raise ConfigError(f"--study {store.study}: no generation has finished yet")
    last = done[-1]
    best = min(
        (s for s in segs if s.generation == last and s.status == "ok"), key=lambda s: (s.val_loss, s.member)
    )
    chain, m = [], best.member
    for g in range(last, -1, -1):
        seg = by_key[(m, g)]
        chain.append(seg)
        m = seg.weights_from
    chain.reverse()
    k, steps = st["interval"], st["steps"]
    entries = [
        {
            "generation": s.generation,
            "member": s.member,
            "start_step": s.generation * k,
            "end_step": s.step,
            "start_fraction": s.generation * k / steps,
            "hparams": s.hparams,
            "val_loss": s.val_loss,
        }
        for s in chain
    ]
    out: dict[str, Any] = {
        "study": store.study,
        "steps": steps,
        "interval": k,
        "generations": st["generations"],
        "complete": row["generation"] >= st["generations"],
        "best_member": best.member,
        "best_val": best.val_loss,
        "best_step": best.step,
        "lineage": entries,
        "final_hparams": chain[-1].hparams,
    }
    if "lr" in chain[0].hparams:
        lr0 = chain[0].hparams["lr"]
        out["lr_schedule"] = [[e["start_fraction"], e["hparams"]["lr"]] for e in entries]
        out["piecewise"] = [[e["start_fraction"], e["hparams"]["lr"] / lr0] for e in entries]
    return out


def generation_rows(store: PbtStore) -> list[dict[str, Any]]:
    segs, evs = store.segments(), store.events()
    rows = []
    for g in sorted({s.generation for s in segs}):
        here = [s for s in segs if s.generation == g]
        ok = sorted((s for s in here if s.status == "ok"), key=lambda s: (s.val_loss, s.member))
        rows.append(
            {
                "generation": g,
                "step": here[0].step,
                "members": len(here),
                "best_val": ok[0].val_loss if ok else None,
                "best_member": ok[0].member if ok else None,
                "median_val": statistics.median(s.val_loss for s in ok) if ok else None,
                "exploits": sum(e["kind"] == "exploit" and e["generation"] == g for e in evs),
                "crash": sum(s.status == "crash" for s in here),
                "nonfinite": sum(s.status == "nonfinite" for s in here),
            }
        )
    return rows


def generation_table(rows: list[dict[str, Any]]) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        "| generation | step | best val (member) | median val | exploits | crash | nonfinite |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = f"{f(r['best_val'])} ({r['best_member']})" if r["best_val"] is not None else "-"
        lines.append(
            f"| {r['generation']} | {r['step']} | {best} | {f(r['median_val'])} | {r['exploits']} "
            f"| {r['crash']} | {r['nonfinite']} |"
        )
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    """Written aside and renamed: several workers may finish the same report at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def plot_val(segs: list[Segment], evs: list[dict], steps: int, interval: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10" if len({s.member for s in segs}) <= 10 else "tab20")
    val = {(s.member, s.step): s.val_loss for s in segs if s.status == "ok"}
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, m in enumerate(sorted({s.member for s in segs})):
        color = cmap(i % cmap.N)
        pieces: list[list[tuple[int, float]]] = [[]]
        for s in sorted((s for s in segs if s.member == m), key=lambda s: s.step):
            start = s.step - interval
            if s.weights_from != s.member:  # exploited: this piece starts from the source's point
                src = val.get((s.weights_from, start))
                pieces.append([(start, src)] if src is not None else [])
            if s.status == "ok":
                pieces[-1].append((s.step, s.val_loss))
            else:
                ax.scatter([s.step], [0.97], marker="x", color=color, transform=top, zorder=4)
                pieces.append([])
        for k, pts in enumerate(p for p in pieces if p):
            ax.plot(*zip(*pts), "-o", ms=3, lw=1, color=color, label=f"member {m}" if k == 0 else None)
    labelled = False
    for e in evs:
        if e["kind"] != "exploit":
            continue
        s, src = e["step"], val.get((e["source"], e["step"]))
        if src is None:
            continue
        dst = val.get((e["member"], s))
        ax.plot([s, s], [dst if dst is not None else src, src], ":", color="k", lw=0.8)
        ax.scatter(
            [s],
            [src],
            marker="v",
            s=36,
            color="k",
            zorder=5,
            label=None if labelled else "exploit (→ source)",
        )
        labelled = True
    ax.set_xlim(0, steps * 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (end of generation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.set_title(f"pbt {title}: members' val loss, exploits marked (× = failed segment)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_lineage(lin: dict[str, Any], space: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    names = sorted(lin["final_hparams"])
    entries = lin["lineage"]
    fig, axes = plt.subplots(
        len(names) + 1, 1, figsize=(7, 2.0 * (len(names) + 1)), sharex=True, squeeze=False
    )
    xs = [e["start_step"] for e in entries] + [entries[-1]["end_step"]]
    switches = [e["start_step"] for a, e in zip(entries, entries[1:]) if e["member"] != a["member"]]
    for ax, name in zip(axes[:, 0], names):
        ys = [e["hparams"][name] for e in entries]
        ax.step(xs, ys + ys[-1:], where="post", color="tab:blue")
        if space.get(name, {}).get("log", True):
            ax.set_yscale("log")
            # plain numbers on a log axis (not 4×10⁰): the values span a few × 1.2 at most
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.set_ylabel(SHORT.get(name, name))
        ax.grid(True, alpha=0.3)
    ax = axes[-1, 0]
    ax.plot([e["end_step"] for e in entries], [e["val_loss"] for e in entries], "-o", ms=3, color="tab:green")
    ax.set_ylabel("val loss")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    for a in axes[:, 0]:
        for s in switches:
            a.axvline(s, color="0.5", ls=":", lw=0.8)
    members = " → ".join(str(m) for m in _runs([e["member"] for e in entries]))
    fig.suptitle(f"pbt {lin['study']}: best lineage (members {members}; dotted = exploit)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _runs(xs: list[int]) -> list[int]:
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


def write_report(store: PbtStore, out_dir: str | Path) -> str:
    """Write the four report files; return the text ``mupfast pbt --report`` prints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    row = store.study_row()
    st = row["settings"]
    lin = lineage(store)
    rows = generation_rows(store)
    evs = store.events()
    counts = {k: sum(e["kind"] == k for e in evs) for k in ("exploit", "explore", "crash", "nonfinite")}
    table = generation_table(rows)
    state = "complete" if lin["complete"] else f"at generation {row['generation']} of {st['generations']}"
    head = (
        f"pbt {store.study}: {st['population']} members × {st['generations']} generations of {st['interval']} steps "
        f"({state}); quantile {st['quantile']:g}, perturb {st['perturb']:g}, resample p {st['resample_p']:g}, seed {st['seed']}"
    )
    totals = ", ".join(f"{n} {k}" for k, n in counts.items())
    hp = "  ".join(f"{SHORT.get(k, k)}={v:.4g}" for k, v in sorted(lin["final_hparams"].items()))
    (out_dir / "generations.md").write_text(f"# {head}\n\nevents: {totals}\n\n{table}\n")
    (out_dir / "lineage.json").write_text(json.dumps({**lin, "events": counts}, indent=2))
    plot_val(store.segments(), evs, st["steps"], st["interval"], out_dir / "val-loss.png", store.study)
    plot_lineage(lin, row["space"], out_dir / "lineage.png")
    lr = ""
    if "lr_schedule" in lin:
        lr = "\nlr along the lineage: " + "  ".join(f"{f:.3g}:{v:.3g}" for f, v in lin["lr_schedule"])
    return "\n".join(
        [
            head,
            f"events: {totals}",
            "",
            table,
            "",
            f"best: member {lin['best_member']} val {lin['best_val']:.4f} at step {lin['best_step']}; "
            f"lineage members {' → '.join(map(str, _runs([e['member'] for e in lin['lineage']])))}",
            f"final values: {hp}{lr}",
            f"report: {out_dir}/ (val-loss.png, lineage.png, generations.md, lineage.json)",
        ]
    )
