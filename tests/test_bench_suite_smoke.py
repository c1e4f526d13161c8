"""`make bench`'s pytest-benchmark suite collects and runs (each benchmark once) on CPU."""

import subprocess
import sys

from tests.helpers import ROOT, subprocess_env


def test_benchmark_suite_runs_once_per_benchmark(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/suite",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-disable",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout
