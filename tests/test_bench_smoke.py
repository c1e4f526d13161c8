"""Every benchmark script runs end to end in its `--smoke` mode (CPU, Triton interpreter) and records
its rows; `make bench`'s pytest-benchmark suite collects and runs once.

Adding a benchmark is one row of ``BENCHES``: the module, the result name, the column naming the
provider and the set of providers it must record (``None`` where the check does it), the columns every
row must carry, and a small check for whatever else is particular to it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from typing import NamedTuple

import pytest

from benchmarks.gpu_plan import SMOKE_TESTS
from mupfast.config import load_config
from mupfast.model.flops import flops_per_token
from tests.helpers import ROOT, compiled_env, run_bench_smoke


class Bench(NamedTuple):
    module: str  # benchmarks.<module>
    name: str  # results are written as *-<name>.json / .md
    provider_key: str | None  # the row column naming who produced the number
    providers: set | None  # the exact set of providers recorded (None: ``check`` handles it)
    columns: set[str]  # present in every row
    check: Callable[[dict, object], None]  # (result JSON, output dir) -> asserts


ATTENTION_COLUMNS = {"mode", "causal", "d_head", "seqlen", "batch", "heads", "dtype", "provider"}
ATTENTION_COLUMNS |= {"median_ms", "min_ms", "max_ms", "tflops", "ours_speedup", "rel_diff_vs_ours"}
ATTENTION_COLUMNS |= {"status"}


def check_attention(result, out_dir):
    assert result["meta"]["benchmark"] == "attention" and result["meta"]["device"]
    rows = result["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and {r["causal"] for r in rows} == {True, False}
    for row in rows:
        assert row["status"] == "ok" and row["tflops"] > 0 and row["median_ms"] > 0
        assert row["rel_diff_vs_ours"] < 1e-5  # fp32: the peer agrees with our kernel
    (md,) = out_dir.glob("*-attention.md")
    header = next(line for line in md.read_text().splitlines() if line.startswith("| mode"))
    assert all(f" {c} " in header for c in ATTENTION_COLUMNS)


def check_clip_adamw(result, out_dir):
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


def check_cross_entropy(result, out_dir):
    assert result["meta"]["device"] and "SMOKE RUN" in result["meta"]["notes"]
    rows = result["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["median_ms"] > 0 and r["dtype"] == "float32"
    peers = [r for r in rows if not r["method"].startswith("mupfast")]
    assert len(peers) == 2
    for r in peers:  # ratios against ours, and the same numbers as ours (fp32)
        assert r["ours_over_peer_time"] > 0
        assert max(r["rel_diff_loss"], r["rel_diff_dh"], r["rel_diff_dW"]) < 1e-4


def check_e2e(result, out_dir):
    notes = result["meta"]["notes"]
    assert "SMOKE RUN" in notes and "mupfast.model.flops" in notes
    rows = {r["variant"]: r for r in result["rows"]}
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    fpt = flops_per_token(tiny.model, tiny.train.seq_len)  # the smoke run keeps the config's seq_len
    for v, row in rows.items():
        assert row["status"] == "ok" and row["model"] == "tiny"
        assert (row["kernels"], row["exec"], row["ac"]) == tuple(v.split("-"))
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"] and row["windows"] >= 1
        assert row["flops_per_token"] == fpt
        assert row["tflops"] == pytest.approx(row["tokens_per_s"] * fpt / 1e12)
        assert row["peak_mem_GiB"] is None and row["mfu_nominal"] is None  # CPU: no CUDA memory, no peak
    base, full = rows["off-eager-none"], rows["off-eager-full"]
    assert base["speedup_vs_base"] == 1.0
    # Losses at every step (4); without an fp32 run the base is the reference (fp32 on the CPU), and
    # checkpointing recomputes the same forward: the same losses.
    assert len(base["losses"]) == 4 and all(r["loss_ref"] == "off-eager-none" for r in rows.values())
    assert base["max_abs_loss_diff_vs_ref"] == 0.0 and full["loss_steps_compared"] == 4
    assert full["max_abs_loss_diff_vs_ref"] < 1e-5
    assert full["speedup_vs_base"] == pytest.approx(full["tokens_per_s"] / base["tokens_per_s"])


def check_activation_memory(result, out_dir):
    rows = {r["mode"]: r for r in result["rows"]}
    none, full, every, sel = (rows[m] for m in ("none", "full", "every_2", "selective"))
    layers = none["layers_measured"]
    assert layers % 2 == 0 and all(
        r["model"] == "tiny" and r["layers_measured"] == layers for r in rows.values()
    )
    assert [r["blocks_checkpointed"] for r in (none, full, every, sel)] == [0, layers, layers // 2, layers]
    # Without checkpointing, what the forward leaves alive is exactly what autograd saved.
    assert none["held_B_per_token_per_block"] == none["saved_B_per_token_per_block"] > 0
    assert none["reduction_vs_none"] == 1.0
    # The target: full checkpointing keeps at least 5x less per block than none.
    assert full["reduction_vs_none"] >= 5
    assert "meets the 5x target" in result["meta"]["notes"]
    # every_2 alternates: checkpointed blocks keep what full keeps, the others what none keeps.
    by_block = {m: r["held_B_per_token_by_block"].split() for m, r in rows.items()}
    assert by_block["every_2"][0::2] == by_block["full"][0::2]
    assert by_block["every_2"][1::2] == by_block["none"][1::2]
    # selective keeps its matmul outputs: between full and none, in a cache autograd's hooks don't see.
    keep = lambda r: r["held_B_per_token_per_block"]
    assert keep(full) < keep(sel) < keep(none)
    assert sel["saved_B_per_token_per_block"] < keep(sel)
    for r in rows.values():
        assert r["blocks_GiB_at_config"] > 0


def check_moe_dispatch(result, out_dir):
    assert "SMOKE RUN" in result["meta"]["notes"] and "8 experts" in result["meta"]["notes"]
    rows = result["rows"]
    assert [r["dispatch"] for r in rows] == ["loop", "grouped"]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["speedup_vs_loop"] > 0
        assert r["max_rel_diff"] < 1e-5  # the same layer, the same routing, fp32


def check_newton_schulz(result, out_dir):
    notes = result["meta"]["notes"]
    assert result["meta"]["device"] and "SMOKE RUN" in notes and "ceiling" in notes
    rows = result["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert {r["shape"] for r in rows} == {"40x40", "40x72", "4x40x40"}
    for r in rows:
        assert r["median_ms"] > 0 and r["effective_TFLOPs"] > 0 and r["frac_of_ceiling"] > 0
        assert r["speedup_vs_torch"] > 0 and r["rel_err_vs_fp64"] < 1e-5  # fp32 on CPU


def check_prepare(result, out_dir):
    assert "SMOKE RUN" in result["meta"]["notes"] and "RAYON_NUM_THREADS=1" in result["meta"]["notes"]
    rows = result["rows"]
    # prepare-data stores exactly the ids the tokenizer's own encode_batch gives (its EOS aside)
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 0
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["per_core_vs_encode_batch"] > 0 and r["peak_rss_mb"] > 0


def bench(module, name, provider_key, providers, columns, check, marks=()):
    """One row of the table, its test id the result name."""
    return pytest.param(Bench(module, name, provider_key, providers, columns, check), id=name, marks=marks)


BENCHES = [
    bench(
        "bench_attention",
        "attention",
        "provider",
        {"mupfast", "sdpa-math"},
        ATTENTION_COLUMNS,
        check_attention,
        marks=pytest.mark.skipif(sys.platform != "linux", reason="Triton runs on Linux"),
    ),
    bench("bench_clip_adamw", "clip_adamw", "method", None, {"method", "status"}, check_clip_adamw),
    bench(
        "bench_cross_entropy",
        "cross_entropy",
        "method",
        None,
        {"N", "d", "V", "dtype", "method", "median_ms", "gemm_TFLOPs", "peak_extra_MB"},
        check_cross_entropy,
    ),
    bench(
        "bench_e2e",
        "e2e",
        "variant",
        {"off-eager-none", "off-eager-full"},
        {"model", "variant", "kernels", "exec", "ac", "tokens_per_s", "tflops", "mfu_measured"}
        | {"speedup_vs_base", "status"},
        check_e2e,
    ),
    bench(
        "bench_activation_memory",
        "activation_memory",
        "mode",
        {"none", "full", "every_2", "selective"},
        {"model", "mode", "saved_B_per_token_per_block", "held_B_per_token_per_block", "reduction_vs_none"}
        | {"blocks_checkpointed", "held_B_per_token_by_block", "blocks_GiB_at_config"},
        check_activation_memory,
    ),
    bench(
        "bench_moe_dispatch",
        "moe_dispatch",
        "dispatch",
        {"loop", "grouped"},
        {"dispatch", "status", "median_ms", "speedup_vs_loop", "max_rel_diff"},
        check_moe_dispatch,
    ),
    bench(
        "bench_newton_schulz",
        "newton_schulz",
        "method",
        {"torch (plain matmuls)", "mupfast Triton (symmetric)"},
        {"method", "status", "shape", "median_ms", "effective_TFLOPs", "frac_of_ceiling"}
        | {"speedup_vs_torch", "rel_err_vs_fp64"},
        check_newton_schulz,
    ),
    bench(
        "bench_prepare",
        "prepare",
        "run",
        {"encode_batch (tokenizer alone)", "prepare-data --workers 1", "prepare-data --workers 2"},
        {"run", "workers", "corpus_mb", "tokens", "seconds", "tokens_per_s", "per_core_vs_encode_batch"}
        | {"peak_rss_mb"},
        check_prepare,
    ),
]


@pytest.mark.parametrize("case", BENCHES)
def test_smoke_benchmark_writes_results(case: Bench, tmp_path):
    result = run_bench_smoke(case.module, case.name, tmp_path)
    rows = result["rows"]
    for row in rows:
        assert case.columns <= row.keys(), case.columns - row.keys()
    if case.providers is not None:
        assert {r[case.provider_key] for r in rows} == case.providers
    case.check(result, tmp_path)


def test_benchmark_suite_runs_once_per_benchmark(tmp_path):
    env = compiled_env()
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


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    help_text = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "carry" in help_text.stdout and "--dry-run" in help_text.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_records_every_part_and_survives_a_timeout(tmp_path):
    """The CPU dry run's plumbing: the GPU smoke set, a kernel benchmark whose budget is too short (it must
    be cut, recorded as a timeout, and leave the other parts their time), bench_e2e with one variant; the
    summary in --out and in $OUT."""
    out, summary = tmp_path / "OUT", tmp_path / "summary"
    out.mkdir()
    env = compiled_env()
    env |= {
        "OUT": str(out),
        "GPU_CHECK_PARTS": "pytest,newton_schulz,e2e",
        "GPU_CHECK_BUDGET_NEWTON_SCHULZ": "5",  # its smoke run takes longer under the interpreter
        "GPU_CHECK_E2E_VARIANTS": "off-eager-none",
        "PYTHON": sys.executable,
    }
    cmd = ["bash", str(GPU_CHECK), "--dry-run", "--out", str(summary)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]  # one part did not pass
    (json_path,) = summary.glob("*-dry-run.json")
    result = json.loads(json_path.read_text())
    status = {p["part"]: p["status"] for p in result["parts"]}
    assert status == {"setup": "ok", "pytest": "ok", "newton_schulz": "timeout", "e2e": "ok"}
    assert not result["meta"]["all_ok"] and result["meta"]["device"]
    pytest_note = next(p["note"] for p in result["parts"] if p["part"] == "pytest")
    # CPU: the GPU smoke set collected, every test skipped
    assert f"{len(SMOKE_TESTS)} skipped" in pytest_note
    (row,) = result["benchmarks"]["e2e"]["rows"]
    assert row["variant"] == "off-eager-none" and row["status"] == "ok" and row["tokens_per_s"] > 0
    assert (summary / json_path.name.replace(".json", ".md")).is_file()
    assert any(summary.glob("*-e2e.json"))  # each benchmark's own results beside the summary
    back = sorted(p.name for p in out.iterdir())  # the device tool returns at most 8 files
    assert back == sorted([json_path.name, json_path.stem + ".md", "gpu-check.tar.gz", "parts.tsv"])
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "results/pytest-junit.xml" in names and "logs/e2e.log" in names and "parts.tsv" in names
    assert any(n.startswith("results/") and n.endswith("-e2e.json") for n in names)
    assert "e2e: model | variant" in proc.stdout and "| newton_schulz | timeout |" in proc.stdout
