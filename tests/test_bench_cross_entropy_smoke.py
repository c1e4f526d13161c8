"""The fused-readout benchmark runs end to end on tiny shapes and records ours against eager."""

from __future__ import annotations

from tests.helpers import run_bench_smoke


def test_bench_cross_entropy_smoke_writes_results(tmp_path):
    result = run_bench_smoke("bench_cross_entropy", "cross_entropy", tmp_path)
    assert result["meta"]["device"] and "SMOKE RUN" in result["meta"]["notes"]
    rows = result["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert {"N", "d", "V", "dtype", "method", "median_ms", "gemm_TFLOPs", "peak_extra_MB"} <= r.keys()
        assert r["median_ms"] > 0 and r["dtype"] == "float32"
    peers = [r for r in rows if not r["method"].startswith("mupfast")]
    assert len(peers) == 2
    for r in peers:  # ratios against ours, and the same numbers as ours (fp32)
        assert r["ours_over_peer_time"] > 0
        assert max(r["rel_diff_loss"], r["rel_diff_dh"], r["rel_diff_dW"]) < 1e-4
