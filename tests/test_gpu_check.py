"""benchmarks/gpu_check.sh fits its call: the plan (benchmarks/gpu_plan.py) budgets every part within 8 minutes
and its smoke set names tests that exist; benchmarks keep each row on disk as they measure it; a run stopped
from outside leaves what it measured in $OUT. The dry run end to end is tests/test_bench_smoke.py's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

from benchmarks import gpu_plan
from benchmarks.common import Recorder
from tests.helpers import ROOT, compiled_env, subprocess_env

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _plan(flag: str, env: dict[str, str]) -> str:
    """What ``python -m benchmarks.gpu_plan FLAG`` prints (the script calls it so)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_plan", flag], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_plan_fits_eight_minutes_and_lists_every_part_with_budget_and_compiles():
    plan = json.loads(_plan("--json", compiled_env()))
    assert plan["total_s"] == sum(p["budget_s"] for p in plan["parts"]) <= 480 and plan["fits"]
    parts = {p["name"]: p for p in plan["parts"]}
    script = GPU_CHECK.read_text()
    (line,) = [ln for ln in script.splitlines() if ln.startswith("ALL_PARTS=")]
    assert set(parts) == {"setup", "summary", *line.split("=", 1)[1].strip('"').split()}
    for p in parts.values():
        assert p["budget_s"] > 0 and isinstance(p["compiles"], int) and p["compiles"] >= 0
        assert p["triton_s"] < p["budget_s"], p  # the Triton compiles (eager rows) fit; inductor may not
    # sm_90a keeps several configs per autotuned kernel: a pruner that kept one would show here
    assert parts["pytest"]["compiles"] > 2 * len(gpu_plan.SMOKE_TESTS)
    assert parts["attention"]["compiles"] > parts["clip_adamw"]["compiles"] > 0


def test_the_budgets_the_script_reads_are_the_plans():
    budgets = dict(line.split() for line in _plan("--budgets", subprocess_env()).splitlines())
    assert budgets == {p.name: str(p.budget_s) for p in gpu_plan.PARTS}


def test_the_smoke_set_is_collected_and_covers_each_kernel_in_bf16_and_fp32():
    ids = list(gpu_plan.SMOKE_TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert sorted(collected) == sorted(ids)
    launches = [x for ls in gpu_plan.SMOKE_TESTS.values() for x in ls]
    for kind in ("attention", "cross_entropy", "clip_adamw", "newton_schulz"):
        assert {d for k, d, _ in launches if k == kind} == {"bf16", "fp32"}, kind


def test_a_recorder_keeps_every_row_on_disk_as_it_is_added(tmp_path):
    rec = Recorder("probe", SimpleNamespace(out=tmp_path, smoke=False), notes="a probe")
    rec.add({"method": "a", "median_ms": 1.5})
    (path,) = tmp_path.glob("*-probe.json")
    first = json.loads(path.read_text())
    assert first["rows"] == [{"method": "a", "median_ms": 1.5}] and "PARTIAL" in first["meta"]["notes"]
    rec.add({"method": "b", "median_ms": 2.5})
    assert [r["method"] for r in json.loads(path.read_text())["rows"]] == ["a", "b"]
    assert "| b | 2.5 |" in path.with_suffix(".md").read_text()
    rec.publish()
    final = json.loads(path.read_text())
    assert len(final["rows"]) == 2 and final["meta"]["notes"] == "a probe"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_the_autotune_winners_of_the_kernels_that_ran_are_written(tmp_path):
    import torch

    from benchmarks.common import write_autotune
    from mupfast.kernels.newton_schulz import newton_schulz_triton

    newton_schulz_triton(torch.randn(40, 72))
    data = json.loads(write_autotune("probe", tmp_path).read_text())
    assert data["benchmark"] == "probe" and data["device"]
    (chosen,) = data["winners"]["newton_schulz._syrk_kernel"].values()
    assert "BLOCK" in chosen and "num_warps" in chosen


def _wait_for(predicate, proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def _rows(path) -> list:
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError):
        return []


def test_a_stopped_run_leaves_its_measured_rows_and_logs_in_out(tmp_path):
    """SIGTERM while the attention benchmark runs, once it has recorded a row: $OUT/gpu-check.tar.gz has
    that row (the benchmark's partial results), its log and the part marked cut; later parts never start."""
    out = tmp_path / "OUT"
    out.mkdir()
    env = subprocess_env() | {"OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env |= {"GPU_CHECK_SETUP": "0", "GPU_CHECK_PARTS": "attention,moe_dispatch"}
    cmd = ["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path / "summary")]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        measuring = lambda: any(_rows(p) for p in tmp_path.glob("gpu-check.*/results/*-attention.json"))
        _wait_for(measuring, proc, 90)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "parts.tsv"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back"
    (rows,) = [_rows(p) for p in (back / "results").glob("*-attention.json")]
    assert rows and all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    tsv = (back / "parts.tsv").read_text()
    assert tsv == (out / "parts.tsv").read_text()
    assert "attention\tcut (signal TERM)" in tsv and "moe_dispatch" not in tsv
    assert (back / "logs" / "attention.log").is_file() and "signal TERM" in stdout
    assert not [p for p in back.rglob(".*")]  # no half-written temporary file
