"""Two DeepSpeed ranks (ZeRO-2) fine-tuning with AdaLoRA on prompt/completion data give the
single-process losses and rank pattern (both ranks prepare the data at once; one directory wins)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

import mupfast.train as trainer
from mupfast.distributed.engine import free_port
from mupfast.finetune.data import prepare_finetune_data
from mupfast.finetune.finetune import finetune_config
from mupfast.rundir import read_metrics
from tests.helpers import deepspeed_cmd, subprocess_env
from tests.test_finetune import make_base_run
from tests.test_finetune_data import write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FT = {
    "finetune": {
        "method": "adalora",
        "target_components": ["q", "v", "ffn_out"],
        "init_rank": 4,
        "target_rank": 2,
        "tinit": 1,
        "tfinal": 1,
    },
    "optim": {"lr": 1.0e-2},
    "train": {
        "steps": 5,
        "micro_batch_size": 2,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 1,
        "progress": False,
    },
    "zero": {"stage": 2},
}


def _finetune_on_two_ranks(ft_yaml, base_run, *overrides: str) -> None:
    """`mupfast.finetune.finetune` on 2 CPU ranks under the deepspeed launcher."""
    cmd = deepspeed_cmd(
        str(ft_yaml), "--num_gpus", "2", "--master_port", str(free_port()), module="mupfast.finetune.finetune"
    )
    cmd += ["--run", str(base_run), *overrides]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_rank_adalora_matches_one_process(tmp_path):
    base_run, _ = make_base_run(tmp_path)
    corpus = write_jsonl(tmp_path / "pc.jsonl")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({**FT, "data": {"corpus": str(corpus)}}))
    one = finetune_config(
        base_run,
        str(tmp_path / "ft.yaml"),
        ["train.grad_accum_steps=2", f"data.dir={tmp_path}/data1", f"train.run_dir={tmp_path}/one"],
    )
    trainer.train(prepare_finetune_data(one))
    _finetune_on_two_ranks(
        tmp_path / "ft.yaml", base_run, f"data.dir={tmp_path}/data2", f"train.run_dir={tmp_path}/two"
    )
    assert len(list((tmp_path / "data2").iterdir())) == 1  # one prepared directory, no leftovers
    a, b = (read_metrics(tmp_path / name, "train") for name in ("one", "two"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-5)
        assert {k: v for k, v in rb.items() if k.startswith("rank/")} == {
            k: v for k, v in ra.items() if k.startswith("rank/")
        }


def test_adalora_resumes_on_one_rank_from_a_two_rank_zero2_checkpoint(tmp_path):
    """#36: the adapters' moments through DeepSpeed's universal checkpoint, AdaLoRA's rank budget and
    importance scores (buffers) with the engine state; the losses and rank pattern of the run that
    was never cut."""
    base_run, _ = make_base_run(tmp_path)
    corpus = write_jsonl(tmp_path / "pc.jsonl")
    ft = {**FT, "train": {**FT["train"], "steps": 6}, "data": {"corpus": str(corpus)}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(ft))
    common = [f"data.dir={tmp_path}/data", "train.grad_accum_steps=2"]
    whole = finetune_config(base_run, str(tmp_path / "ft.yaml"), [*common, f"train.run_dir={tmp_path}/whole"])
    trainer.train(prepare_finetune_data(whole))
    _finetune_on_two_ranks(
        tmp_path / "ft.yaml",
        base_run,
        f"data.dir={tmp_path}/data",
        f"train.run_dir={tmp_path}/cut",
        "train.stop_at=3",
    )
    cut = finetune_config(base_run, str(tmp_path / "ft.yaml"), [*common, f"train.run_dir={tmp_path}/cut"])
    trainer.train(prepare_finetune_data(cut))
    assert (tmp_path / "cut" / "checkpoints" / "universal" / "step00000003").is_dir()
    a = {r["step"]: r for r in read_metrics(tmp_path / "whole", "train")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut", "train")}
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-5), step
        assert {k: v for k, v in b[step].items() if k.startswith("rank/")} == {
            k: v for k, v in a[step].items() if k.startswith("rank/")
        }
