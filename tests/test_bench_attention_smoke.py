"""The attention benchmark runs end to end (`--smoke`: CPU, Triton interpreter) and records its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"mode", "causal", "d_head", "seqlen", "batch", "heads", "dtype", "provider"}
COLUMNS |= {"median_ms", "min_ms", "max_ms", "tflops", "ours_speedup", "rel_diff_vs_ours", "status"}


@pytest.mark.skipif(sys.platform != "linux", reason="Triton runs on Linux")
def test_smoke_benchmark_writes_rows_for_ours_and_the_sdpa_peer(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (md,) = tmp_path.glob("*-attention.md")
    (js,) = tmp_path.glob("*-attention.json")
    data = json.loads(js.read_text())
    assert data["meta"]["benchmark"] == "attention" and data["meta"]["device"]
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"mupfast", "sdpa-math"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and {r["causal"] for r in rows} == {True, False}
    for row in rows:
        assert COLUMNS <= row.keys(), COLUMNS - row.keys()
        assert row["status"] == "ok" and row["tflops"] > 0 and row["median_ms"] > 0
        assert row["rel_diff_vs_ours"] < 1e-5  # fp32: the peer agrees with our kernel
    header = next(line for line in md.read_text().splitlines() if line.startswith("| mode"))
    assert all(f" {c} " in header for c in COLUMNS)
