"""The fused-readout benchmark runs end to end on tiny shapes and records ours against eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cross_entropy_smoke_writes_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not os.path.exists("/dev/nvidiactl"):
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.bench_cross_entropy", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-cross_entropy.json")
    assert json_path.with_suffix(".md").exists()
    result = json.loads(json_path.read_text())
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
