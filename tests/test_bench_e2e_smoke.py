"""The end-to-end benchmark runs the real trainer and records tokens/s and MFU (CPU smoke)."""

import json
import subprocess
import sys

from tests.helpers import ROOT, subprocess_env


def test_bench_e2e_smoke_writes_results(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-e2e.json")
    result = json.loads(path.read_text())
    assert "SMOKE RUN" in result["meta"]["notes"]
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["kernels"] == "off"
    assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"]
