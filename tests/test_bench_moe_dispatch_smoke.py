"""The MoE dispatch benchmark runs end to end on a tiny layer and records loop against grouped."""

from __future__ import annotations

from tests.helpers import run_bench_smoke


def test_bench_moe_dispatch_smoke_writes_results(tmp_path):
    result = run_bench_smoke("bench_moe_dispatch", "moe_dispatch", tmp_path)
    assert "SMOKE RUN" in result["meta"]["notes"] and "8 experts" in result["meta"]["notes"]
    rows = result["rows"]
    assert [r["dispatch"] for r in rows] == ["loop", "grouped"]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["speedup_vs_loop"] > 0
        assert r["max_rel_diff"] < 1e-5  # the same layer, the same routing, fp32
