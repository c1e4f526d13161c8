"""The clip+AdamW benchmark runs end to end on tiny shapes and records every method."""

from __future__ import annotations

import re

from tests.helpers import run_bench_smoke


def test_bench_clip_adamw_smoke_writes_results(tmp_path):
    result = run_bench_smoke("bench_clip_adamw", "clip_adamw", tmp_path)
    rows = {r["method"]: r for r in result["rows"]}
    assert len(rows) == 5
    for name in ("mupfast", "torch AdamW(fused=True)", "torch AdamW(foreach=True)"):
        (row,) = [r for m, r in rows.items() if m.startswith(name)]
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["frac_of_copy_bw"] > 0
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows.values())
    notes = result["meta"]["notes"]
    assert "copy bandwidth" in notes and result["meta"]["device"]
    agreement = float(re.search(r"after one clipped step: ([0-9.e+-]+)", notes).group(1))
    assert agreement < 1e-5
