"""The attention benchmark runs end to end (`--smoke`: CPU, Triton interpreter) and records its rows."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import run_bench_smoke

COLUMNS = {"mode", "causal", "d_head", "seqlen", "batch", "heads", "dtype", "provider"}
COLUMNS |= {"median_ms", "min_ms", "max_ms", "tflops", "ours_speedup", "rel_diff_vs_ours", "status"}


@pytest.mark.skipif(sys.platform != "linux", reason="Triton runs on Linux")
def test_smoke_benchmark_writes_rows_for_ours_and_the_sdpa_peer(tmp_path):
    data = run_bench_smoke("bench_attention", "attention", tmp_path)
    assert data["meta"]["benchmark"] == "attention" and data["meta"]["device"]
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"mupfast", "sdpa-math"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and {r["causal"] for r in rows} == {True, False}
    for row in rows:
        assert COLUMNS <= row.keys(), COLUMNS - row.keys()
        assert row["status"] == "ok" and row["tflops"] > 0 and row["median_ms"] > 0
        assert row["rel_diff_vs_ours"] < 1e-5  # fp32: the peer agrees with our kernel
    (md,) = tmp_path.glob("*-attention.md")
    header = next(line for line in md.read_text().splitlines() if line.startswith("| mode"))
    assert all(f" {c} " in header for c in COLUMNS)
