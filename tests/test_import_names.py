"""The checkout's top-level ``kernels/`` never hides Hugging Face's ``kernels`` (which transformers
imports): not under pytest, and not in a fresh interpreter started at the repository root."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mupfast.export import export_run
from mupfast.export.generate import generate_ids
from tests.helpers import ROOT, subprocess_env
from tests.test_export import LLAMA, MUP, make_run, width


def _installed_kernels_dir() -> Path:
    """Where the installed ``kernels`` distribution keeps its package; skips when none is installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no `kernels` distribution installed (transformers < 5.25 does not need one)")
    init = next(f for f in dist.files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return Path(dist.locate_file(init)).resolve().parent


def _at_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the working directory at the repository root (so it is on sys.path)."""
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def test_import_kernels_finds_the_installed_package_under_pytest():
    installed = _installed_kernels_dir()
    assert str(ROOT) in map(str, map(lambda p: Path(p).resolve() if p else Path.cwd(), sys.path))
    import kernels

    assert Path(kernels.__file__).resolve().parent == installed
    assert Path(importlib.util.find_spec("mupfast.kernels.attention").origin).parent == ROOT / "kernels"


def test_import_kernels_at_the_repository_root_finds_the_installed_package():
    installed = _installed_kernels_dir()
    proc = _at_root(
        "import kernels, mupfast.kernels.attention as a; print(kernels.__file__); print(a.__file__)"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, ours = proc.stdout.split()
    assert Path(theirs).resolve().parent == installed
    assert Path(ours).resolve() == ROOT / "kernels" / "attention.py"


def test_an_export_loads_and_generates_in_transformers_started_at_the_repository_root(tmp_path):
    """`AutoModelForCausalLM.from_pretrained` on an exported run, in a fresh interpreter at the root:
    transformers imports `kernels` while building the model, and greedy decoding equals ours."""
    pytest.importorskip("transformers")
    cfg, run_dir, model = make_run(
        tmp_path, *MUP, *LLAMA, *width(64), "model.num_kv_heads=2", "model.mup_base_num_kv_heads=2"
    )
    export_run(run_dir, tmp_path / "hf")
    prompt = torch.randint(0, cfg.model.vocab_size, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = generate_ids(model, prompt, max_new_tokens=8, temperature=0)
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, local_files_only=True).float()\n"
        f"out = hf.generate(torch.tensor([{prompt}]), max_new_tokens=8, do_sample=False,"
        " pad_token_id=0, eos_token_id=None)\n"
        "print(json.dumps(out[0].tolist()))\n"
    )
    proc = _at_root(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == prompt + list(ours)
