"""Every benchmark script runs end to end in its `--smoke` mode (CPU, Triton interpreter) and records
its rows; `make bench`'s pytest-benchmark suite collects and runs once.

Adding a benchmark is one row of ``BENCHES``: the module, the result name, the column naming the
provider and the set of providers it must record (``None`` where the check does it), the columns every
row must carry, and a small check for whatever else is particular to it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest

from tests.helpers import ROOT, run_bench_smoke, subprocess_env


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
    assert "SMOKE RUN" in result["meta"]["notes"]
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["kernels"] == "off"
    assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"]


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
        "kernels",
        {"off"},
        {"model", "kernels", "tokens_per_s", "mfu_measured"},
        check_e2e,
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
