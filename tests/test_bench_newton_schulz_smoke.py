"""The Newton–Schulz benchmark runs end to end on tiny shapes and records torch against the kernel."""

from __future__ import annotations

from tests.helpers import run_bench_smoke


def test_bench_newton_schulz_smoke_writes_results(tmp_path):
    result = run_bench_smoke("bench_newton_schulz", "newton_schulz", tmp_path)
    notes = result["meta"]["notes"]
    assert result["meta"]["device"] and "SMOKE RUN" in notes and "ceiling" in notes
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"torch (plain matmuls)", "mupfast Triton (symmetric)"}
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {r["shape"] for r in rows} == {"40x40", "40x72", "4x40x40"}
    for r in rows:
        assert r["median_ms"] > 0 and r["effective_TFLOPs"] > 0 and r["frac_of_ceiling"] > 0
        assert r["speedup_vs_torch"] > 0 and r["rel_err_vs_fp64"] < 1e-5  # fp32 on CPU
