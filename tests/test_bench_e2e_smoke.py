"""The end-to-end benchmark runs the real trainer and records tokens/s and MFU (CPU smoke)."""

from tests.helpers import run_bench_smoke


def test_bench_e2e_smoke_writes_results(tmp_path):
    result = run_bench_smoke("bench_e2e", "e2e", tmp_path)
    assert "SMOKE RUN" in result["meta"]["notes"]
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["kernels"] == "off"
    assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured"]
