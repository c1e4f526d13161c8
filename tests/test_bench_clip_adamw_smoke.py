"""The clip+AdamW benchmark runs end to end on tiny shapes and records every method."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_clip_adamw_smoke_writes_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not os.path.exists("/dev/nvidiactl"):
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.bench_clip_adamw", "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-clip_adamw.json")
    assert json_path.with_suffix(".md").exists()
    result = json.loads(json_path.read_text())
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
