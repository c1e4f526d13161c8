"""What an A100 (sm_80) and a Hopper (sm_90a) build of every kernel shows, without a GPU.

``mupfast.kernels.targets`` compiles the autotune configurations each kernel keeps after its own pruning for
the target (attention forward / backward preprocess / dK dV / dQ over head dims, GQA, document masking and
dtypes; the readout's row kernel; Newton–Schulz; clip + AdamW) with Triton's bundled ptxas, in a subprocess
without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives objects that cannot be compiled).
A build fails here on a compile error, on a kept config that needs more shared memory than the target has
(the pruners must drop those, so that every variant launches), and on register spills in 16-bit configs.
The sample compiles twice: with this environment's Triton and with the GPU image's (``GPU_IMAGE_TRITON``,
side-installed into ``.preflight/`` by ``make test`` and ``make preflight``; skipped, saying so, without it).

The default run compiles the corners (``QUICK`` in mupfast.kernels.targets: 25 compiles, ~35 s on 2 cores) and
lists the whole matrix without compiling it (does every variant keep a config?); compiling the whole matrix
(~650 compiles, ~15 minutes on 2 cores) runs with ``MUPFAST_ALL_TARGETS=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import ROOT

triton = pytest.importorskip("triton")

# 16-bit configs may spill at most this much (bytes of spill stores per thread): "a few bytes" of an
# occasional spilled index; more is a config that should have fewer tiles per warp.
SPILL_SLACK = 8
# The GPU machine's image has Triton 3.6.0 (and torch 2.11): its compiler must take every kernel too. The
# Makefile's PREFLIGHT_TRITON installs it into .preflight/triton-<version> (keep the two in step).
GPU_IMAGE_TRITON = "3.6.0"
SIDE_TRITON = ROOT / ".preflight" / f"triton-{GPU_IMAGE_TRITON}"
# The readout's vocabulary blocks are 4096 wide: with the row stride padded and whole blocks unmasked, each
# pass loads them with 128-bit accesses (two per thread per block at 8 warps, 16-bit logits).
VOCAB = 50257


def _ptxas_available() -> bool:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists()


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is missing")


def _env(tmp: Path, first: Path | None = None) -> dict:
    """The compile tool's environment; ``first``: a folder put first on PYTHONPATH (another Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # empty: every kernel goes through ptxas
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # clip_adamw launches without the option: no warning
    if first is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(first), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _compile(sample: str, tmp: Path, timeout: int, first: Path | None = None) -> list[dict]:
    out = tmp / "results.json"
    cmd = [sys.executable, "-m", "mupfast.kernels.targets", "--sample", sample, "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(tmp, first), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> list[dict]:
    return _compile("quick", tmp_path_factory.mktemp("targets-quick"), timeout=600)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> list[dict]:
    return _compile("full", tmp_path_factory.mktemp("targets-full"), timeout=4 * 3600)


def _label(r: dict) -> str:
    return f"{r['kernel']} {r['target']} {r['variant']} [{r['config']}]"


def _errors(results):
    return [f"{_label(r)}: {r['error']}" for r in results if r["error"]]


def _over_shared_memory(results):
    return [f"{_label(r)}: {r['shared']} B > {r['smem_limit']} B" for r in results
            if not r["error"] and r["shared"] > r["smem_limit"]]  # fmt: skip


def _unlaunchable_variants(results):
    """Variants (kernel, target, variant) without one kept config that compiles and fits."""
    ok = defaultdict(bool)
    for r in results:
        key = (r["kernel"], r["target"], json.dumps(r["variant"], sort_keys=True))
        ok[key] |= not r["error"] and r["shared"] <= r["smem_limit"]
    return [key for key, fine in ok.items() if not fine]


def _spills(results):
    return [f"{_label(r)}: {r['spill_stores']} B spill stores, {r['registers']} registers" for r in results
            if r["sixteen_bit"] and r["spill_stores"] > SPILL_SLACK]  # fmt: skip


def _check_all(results):
    assert results, "nothing compiled"
    assert {r["target"] for r in results} == {"sm_80", "sm_90a"}
    assert not _errors(results), "\n".join(_errors(results))
    assert not _over_shared_memory(results), "\n".join(_over_shared_memory(results))
    assert not _unlaunchable_variants(results), _unlaunchable_variants(results)
    assert not _spills(results), "\n".join(_spills(results))


# --------------------------------------------------------------------------------------- quick
def test_every_variant_of_the_full_matrix_keeps_a_config_on_both_targets(tmp_path):
    """No compiling: the pruners, run for sm_80 and sm_90a on every variant, each keep a config whose shared
    memory estimate fits (the compiled sizes are checked against the limits below and in the slow test)."""
    cmd = [sys.executable, "-m", "mupfast.kernels.targets", "--sample", "full", "--list"]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300, check=True)
    jobs = json.loads(proc.stdout)
    from mupfast.kernels.targets import KERNELS

    assert {j["kernel"] for j in jobs} == set(KERNELS) and {j["target"] for j in jobs} == {"sm_80", "sm_90a"}
    assert not [j for j in jobs if j["config"] is None]


def test_every_kernel_is_in_the_sample(quick):
    from mupfast.kernels.targets import KERNELS

    scalar_kernels = {"clip_adamw_group_sum", "clip_adamw_coef"}  # one program, a few scalars: full set only
    assert {r["kernel"] for r in quick} == set(KERNELS) - scalar_kernels


def test_sample_compiles_without_errors(quick):
    assert not _errors(quick), "\n".join(_errors(quick))


def test_sample_kept_configs_fit_the_targets_shared_memory(quick):
    assert not _over_shared_memory(quick), "\n".join(_over_shared_memory(quick))
    assert not _unlaunchable_variants(quick), _unlaunchable_variants(quick)


def test_sample_sixteen_bit_configs_do_not_spill(quick):
    assert any(r["sixteen_bit"] for r in quick)
    assert not _spills(quick), "\n".join(_spills(quick))


def _readout_rows_not_vectorised(results):
    rows = [r for r in results if r["kernel"] == "cross_entropy_rows" and r["variant"]["V"] == VOCAB]
    if not rows:
        return [f"no cross_entropy_rows result at V = {VOCAB}"]
    return [_label(r) for r in rows if r["vector_loads"] < 4 or r["vector_stores"] < 1]


def test_readout_rows_load_and_store_with_vector_accesses(quick):
    assert not _readout_rows_not_vectorised(quick), _readout_rows_not_vectorised(quick)


# ------------------------------------------------------------------ the GPU image's Triton (quick)
@pytest.mark.skipif(
    not (SIDE_TRITON / ".installed").exists(),
    reason=f"Triton {GPU_IMAGE_TRITON} (the GPU image's) is not side-installed in "
    f"{SIDE_TRITON.relative_to(ROOT)}/: `make preflight-triton` installs it from PyPI (`make test` tries to, "
    "and goes on without it when PyPI is unreachable)",
)
def test_sample_compiles_fits_and_does_not_spill_under_the_gpu_images_triton(tmp_path):
    """The same corners, compiled by the GPU image's Triton (its package first on PYTHONPATH, with this
    venv's torch for the meta tensors): no errors, the kept configs fit, 16-bit ones do not spill."""
    from mupfast.kernels.targets import QUICK

    results = _compile("quick", tmp_path, timeout=600, first=SIDE_TRITON)
    assert {r["triton"] for r in results} == {GPU_IMAGE_TRITON}
    assert {r["kernel"] for r in results} == {name for name, _, _ in QUICK}
    _check_all(results)
    assert not _readout_rows_not_vectorised(results), _readout_rows_not_vectorised(results)


# ---------------------------------------------------------------------------------------- full
# `make test` runs the slow tests too, and CI's 2 cores have no 15 minutes to spare: the whole matrix
# is compiled on request (MUPFAST_ALL_TARGETS=1), e.g. before changing a kernel's configs.
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MUPFAST_ALL_TARGETS") != "1",
    reason="the full compile matrix (~650 compiles, ~15 min on 2 cores): set MUPFAST_ALL_TARGETS=1",
)
def test_full_matrix_compiles_fits_and_does_not_spill(full):
    _check_all(full)
    rows = [r for r in full if r["kernel"] == "cross_entropy_rows" and r["variant"]["V"] == VOCAB]
    assert all(r["vector_loads"] >= 2 for r in rows), [_label(r) for r in rows if r["vector_loads"] < 2]
