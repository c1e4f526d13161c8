"""The pytest-benchmark suite (`make bench`): ours and each peer side by side, grouped by op and
shape, plus the device ceilings measured in the same process.

On a GPU the Triton kernels run against their peers; on CPU the torch paths do (the Triton
interpreter's timings mean nothing). Every benchmark records its work (FLOPs or bytes) in
``extra_info`` and the session adds the fraction of the ceiling to each result.
"""

from __future__ import annotations

import os

if not os.path.exists("/dev/nvidiactl"):  # the kernels import Triton; never interpret here
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.ceiling import probe  # noqa: E402
from benchmarks.common import device_name, versions, write_results  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
_CEILING: dict = {}


@pytest.fixture(scope="session")
def ceiling() -> dict:
    if not _CEILING:
        _CEILING.update(probe(DEVICE))
    return _CEILING


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mupfast"] = {"device": device_name(DEVICE), "versions": versions(), "ceiling": _CEILING}
    for b in output_json["benchmarks"]:
        _add_fractions(b["extra_info"], b["stats"]["median"])


def _add_fractions(info: dict, median_s: float) -> None:
    if "flops" in info and _CEILING:
        info["tflops"] = info["flops"] / median_s / 1e12
        info["fraction_of_matmul"] = info["tflops"] / _CEILING["matmul_tflops"]
    if "bytes" in info and _CEILING:
        info["gbs"] = info["bytes"] / median_s / 1e9
        info["fraction_of_copy"] = info["gbs"] / _CEILING["copy_gbs"]


def pytest_sessionfinish(session, exitstatus):
    """Also write the side-by-side table under benchmarks/results/ (Markdown + JSON)."""
    bs = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if not bs or session.config.getoption("benchmark_disable", False):
        return
    rows = []
    for b in sorted(bs, key=lambda b: (b.group or "", b.name)):
        info = dict(b.extra_info)
        _add_fractions(info, b.stats.median)
        rows.append(
            {
                "group": b.group,
                "name": b.name.split("[")[0],
                "median_ms": b.stats.median * 1e3,
                "iqr_ms": b.stats.iqr * 1e3,
                "rounds": b.stats.rounds,
                **{k: v for k, v in info.items() if k not in ("flops", "bytes")},
            }
        )
    notes = f"ceiling: {_CEILING}" if _CEILING else ""
    out = os.environ.get("MUPFAST_BENCH_OUT")
    write_results("suite", rows, notes=notes, out_dir=None if not out else __import__("pathlib").Path(out))
