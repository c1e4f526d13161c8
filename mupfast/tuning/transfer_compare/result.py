"""What a ``transfer-compare`` result concludes from its runs: each path's best, the FLOPs totals and
ratio, the transfer gap, and the two verdicts.

:func:`derive` is the one place these follow from the runs' entries, so a result that gains runs
later (``--extend``: a wider SP grid) is summarised exactly as a fresh one is.
"""

from __future__ import annotations

import math
from typing import Any

#: The issue's targets: μTransfer's tuning FLOPs at most this fraction of SP's, and the transferred
#: lr's target loss within this many percent of the best of the target's own μP lr grid.
MAX_FLOPS_RATIO = 0.25
MAX_TRANSFER_GAP_PCT = 0.5


def best_entry(entries: list[dict]) -> dict | None:
    """The entry with the lowest finite mean val loss, None if every one diverged."""
    finite = [e for e in entries if e["val_loss"] is not None and math.isfinite(e["val_loss"])]
    return min(finite, key=lambda e: e["val_loss"]) if finite else None


def at_lr_edge(entries: list[dict], best: dict | None) -> bool:
    """The best lr is the smallest or largest of its grid (the true optimum may lie outside)."""
    if best is None:
        return False
    lrs = sorted({e["lr"] for e in entries if e.get("init_std") == best.get("init_std")})
    return best["lr"] in (lrs[0], lrs[-1])


def verdicts(mut: float, sp: float, ratio: float, gap_pct: float | None) -> list[dict[str, Any]]:
    """The two claims under test, each with the numbers it follows from."""
    loss_ok = math.isfinite(mut) and mut <= sp
    flops_ok = ratio <= MAX_FLOPS_RATIO
    gap_ok = gap_pct is not None and gap_pct <= MAX_TRANSFER_GAP_PCT

    def word(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return [
        {
            "claim": f"μTransfer's best ≤ SP tuned at the target, at ≤ {MAX_FLOPS_RATIO:g}× SP's tuning FLOPs",
            "loss_ok": loss_ok,
            "flops_ok": flops_ok,
            "pass": loss_ok and flops_ok,
            "line": f"{word(loss_ok and flops_ok)}: μTransfer's best val loss {mut:.4f} "
            f"{'≤' if loss_ok else '>'} SP-tuned {sp:.4f} ({word(loss_ok)}), tuning FLOPs {ratio:.3f}× "
            f"SP's {'≤' if flops_ok else '>'} {MAX_FLOPS_RATIO:g} ({word(flops_ok)})",
        },
        {
            "claim": f"the transferred lr within {MAX_TRANSFER_GAP_PCT:g}% of the target's own best μP lr",
            "pass": gap_ok,
            "line": f"{word(gap_ok)}: the transferred lr's val loss is "
            + ("— (no finite loss)" if gap_pct is None else f"{gap_pct:.3f}%")
            + f" above the best of μP's target lr grid ({'≤' if gap_ok else '>'} {MAX_TRANSFER_GAP_PCT:g}%)",
        },
    ]


def derive(r: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``r``'s conclusions from its entries (in place; returns ``r``).

    Reads the runs (``mutransfer.configs``, ``sp.grid``, ``mup_hand_set``, ``mup_lr_grid.grid`` with
    its ``center``) and ``flops.proxy``; writes each path's best, the FLOPs totals and ratio, the
    target-run counts, the transfer gap and the verdicts.
    """
    mut_entries, sp_entries = r["mutransfer"]["configs"], r["sp"]["grid"]
    hand, grid = r["mup_hand_set"], r["mup_lr_grid"]
    mut_best, sp_best, grid_best = best_entry(mut_entries), best_entry(sp_entries), best_entry(grid["grid"])
    center = next(e for e in mut_entries if e["key"] == grid["center"])
    r["mutransfer"]["best"] = mut_best["key"] if mut_best else None
    r["sp"].update(best=sp_best["key"] if sp_best else None, at_edge=at_lr_edge(sp_entries, sp_best))
    grid.update(
        best_exponent=grid_best["exponent"] if grid_best else None,
        at_edge=at_lr_edge(grid["grid"], grid_best),
    )
    inf = math.inf
    r["best"] = {
        "mutransfer": mut_best["val_loss"] if mut_best else inf,
        "sp": sp_best["val_loss"] if sp_best else inf,
        "mup_hand_set": hand["val_loss"],
        "mup_lr_grid": grid_best["val_loss"] if grid_best else inf,
    }
    gap = (
        100.0 * (center["val_loss"] - grid_best["val_loss"]) / grid_best["val_loss"]
        if grid_best is not None and mut_best is not None
        else None
    )
    f = r["flops"]
    extra = [e for e in grid["grid"] if e["exponent"]]
    f["validation"] = sum(e["flops"] for e in mut_entries)
    f["mutransfer"] = f["proxy"] + f["validation"]
    f["sp"] = sum(e["flops"] for e in sp_entries)
    f["mup_lr_grid_extra"] = sum(e["flops"] for e in extra)
    f["hand_set"] = hand["flops"]
    f["ratio"] = f["mutransfer"] / f["sp"]
    f["target_runs"] = {
        "validation": sum(e["runs"] for e in mut_entries),
        "sp": sum(e["runs"] for e in sp_entries),
        "mup_lr_grid_extra": sum(e["runs"] for e in extra),
        "hand_set": hand["runs"],
    }
    r["transfer_gap_pct"] = gap
    r["verdicts"] = verdicts(r["best"]["mutransfer"], r["best"]["sp"], f["ratio"], gap)
    return r
