"""The trainer end to end on CPU: it learns, resumes exactly, survives non-finite losses, and
2-rank DeepSpeed ZeRO runs match the single-process losses."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mupfast.train as trainer
from mupfast.distributed.engine import free_port
from mupfast.rundir import read_metrics
from tests.helpers import (
    crash_after_checkpoint_then_resume,
    deepspeed_cmd,
    subprocess_env,
    tiny_config,
    write_config,
)

COMMON = ["train.log_every=1", "train.eval_every=0", "optim.lr=3e-3", "schedule.warmup_steps=2"]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def test_training_lowers_the_loss_and_writes_its_run_directory(tmp_path):
    cfg = tiny_config(*COMMON, "train.steps=30", "optim.lr=1e-2", tmp_path=tmp_path)
    result = trainer.train(cfg)
    run = Path(cfg.train.run_dir)
    assert result.train_losses[30] < result.train_losses[1] - 1.0
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000030"
    rec = read_metrics(run, "train")[-1]
    assert {"loss", "tokens_per_s", "lr/q", "grad_norm/q", "clip_coef/embedding", "max_abs_logit"} <= set(rec)
    assert read_metrics(run, "eval")[-1]["val_loss"] == pytest.approx(result.val_losses[30])
    assert list((run / "tensorboard").iterdir())


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    overrides = [
        *COMMON,
        "train.steps=8",
        "train.save_every=3",
        "schedule.kind=wsd",
        "schedule.decay_fraction=0.5",
    ]
    full = tiny_config(*overrides, tmp_path=tmp_path / "full")
    trainer.train(full)

    cut = tiny_config(*overrides, tmp_path=tmp_path / "cut")
    crash_after_checkpoint_then_resume(cut, 3, monkeypatch)
    a, b = _losses(full.train.run_dir), _losses(cut.train.run_dir)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == a[step], step  # bitwise: same data, same RNG, same lrs
    lr_a = {r["step"]: r["lr/q"] for r in read_metrics(full.train.run_dir, "train")}
    lr_b = {r["step"]: r["lr/q"] for r in read_metrics(cut.train.run_dir, "train")}
    assert lr_a == lr_b


def test_stop_at_trains_in_segments_that_equal_one_run(tmp_path):
    """PBT trains a member one interval at a time: train.stop_at stops (with an eval and a checkpoint)
    while the schedule keeps train.steps as its length, so the segments reproduce one uninterrupted run."""
    overrides = [*COMMON, "train.steps=8", "schedule.kind=cosine", "schedule.min_lr_ratio=0.0"]
    full = trainer.train(tiny_config(*overrides, tmp_path=tmp_path / "full"))
    seg = tiny_config(*overrides, tmp_path=tmp_path / "seg")
    first = trainer.train(tiny_config(*overrides, "train.stop_at=3", tmp_path=tmp_path / "seg"))
    assert first.steps == 3 and 3 in first.val_losses
    assert (Path(seg.train.run_dir) / "checkpoints" / "latest").read_text().strip() == "step00000003"
    trainer.train(tiny_config(*overrides, "train.stop_at=6", tmp_path=tmp_path / "seg"))
    rest = trainer.train(seg)
    assert _losses(seg.train.run_dir) == full.train_losses
    assert rest.val_losses[8] == full.val_losses[8]


def test_a_resumed_run_uses_its_configs_hyperparameters_not_the_checkpoints(tmp_path, monkeypatch):
    overrides = [*COMMON, "train.steps=4"]
    trainer.train(tiny_config(*overrides, "train.stop_at=2", tmp_path=tmp_path))
    seen = []
    step = trainer.build_optimizer.__globals__["ClipAdamW"].step

    def spy(self, *a, **k):
        seen.append(
            [(g["betas"], g["eps"], g["max_grad_norm"], g["weight_decay"]) for g in self.param_groups]
        )
        return step(self, *a, **k)

    monkeypatch.setattr(trainer.build_optimizer.__globals__["ClipAdamW"], "step", spy)
    changed = ["optim.beta1=0.5", "optim.eps=1e-5", "clip.max_norm=0.25", "optim.weight_decay=0.2"]
    trainer.train(tiny_config(*overrides, *changed, tmp_path=tmp_path))
    assert len(seen) == 2  # steps 3 and 4
    for groups in seen:
        assert all(b == (0.5, 0.95) and e == 1e-5 and n == 0.25 for b, e, n, _ in groups)
        assert {wd for *_, wd in groups} == {0.0, 0.2}  # norms and biases keep none


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    cfg = tiny_config(
        *COMMON, "train.steps=20", "train.save_every=2", "train.max_nonfinite_in_row=3", tmp_path=tmp_path
    )
    real_build = trainer.build_model
    calls = {"n": 0}

    def poisoned(model_cfg):
        model = real_build(model_cfg)
        forward = model.forward

        def forward_nan_after_step_4(tokens, targets=None):
            out = forward(tokens, targets)
            if targets is not None and model.training:
                calls["n"] += 1
                if calls["n"] in (3,) or calls["n"] > 5:
                    return out * float("nan")
            return out

        model.forward = forward_nan_after_step_4
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with pytest.raises(
        trainer.TrainingError, match=r"3 non-finite losses in a row at step 8.*last good checkpoint"
    ):
        trainer.train(cfg)
    events = read_metrics(cfg.train.run_dir, "event")
    assert [e["step"] for e in events] == [3, 6, 7, 8]  # step 3 was skipped, then the run went on
    assert (Path(cfg.train.run_dir) / "checkpoints" / "latest").read_text().strip() == "step00000004"


def test_a_skipped_last_step_still_ends_with_its_eval_and_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(*COMMON, "train.steps=6", "train.stop_at=4", tmp_path=tmp_path)
    real_build = trainer.build_model

    def poisoned(model_cfg):
        model = real_build(model_cfg)
        forward, calls = model.forward, {"n": 0}

        def forward_nan_at_step_4(tokens, targets=None):
            out = forward(tokens, targets)
            if targets is not None and model.training:
                calls["n"] += 1
                if calls["n"] == 4:
                    return out * float("nan")
            return out

        model.forward = forward_nan_at_step_4
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    result = trainer.train(cfg)
    assert [e["step"] for e in read_metrics(cfg.train.run_dir, "event")] == [4]
    assert 4 in result.val_losses and 4 not in result.train_losses
    assert (Path(cfg.train.run_dir) / "checkpoints" / "latest").read_text().strip() == "step00000004"


def _deepspeed_run(
    tmp_path: Path, name: str, overrides: list[str], ranks: int, module: str = "mupfast.train"
) -> dict[int, float]:
    cfg = tiny_config(*overrides, tmp_path=tmp_path / name)
    port = free_port()
    cmd = deepspeed_cmd(
        write_config(cfg, tmp_path / f"{name}.yaml"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        module=module,
    )
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (64 MiB of RAM each) are not left behind in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return _losses(cfg.train.run_dir)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_matches_single_process(tmp_path, stage):
    base = [*COMMON, "train.steps=5", "train.micro_batch_size=2", "clip.max_norm=0.05"]
    single = trainer.train(tiny_config(*base, "train.grad_accum_steps=2", tmp_path=tmp_path / "single"))
    coefs = [
        v
        for r in read_metrics(tmp_path / "single" / "run", "train")
        for k, v in r.items()
        if "clip_coef" in k
    ]
    assert (
        min(coefs) < 0.5 and max(coefs) == 1.0
    )  # some components clipped, others not: clipping is exercised
    two = _deepspeed_run(tmp_path, f"zero{stage}", [*base, f"zero.stage={stage}"], ranks=2)
    assert sorted(two) == list(range(1, 6))
    for step, loss in single.train_losses.items():
        assert two[step] == pytest.approx(loss, rel=2e-5), step
    summary = json.loads((tmp_path / f"zero{stage}" / "run" / "summary.json").read_text())
    assert summary["steps"] == 5


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  hidden_sise: 64\n")
    cases = [
        (
            ["--config", str(tmp_path / "bad.yaml")],
            "model.hidden_sise: unknown key (did you mean model.hidden_size?)",
        ),
        (["model.hidden_size=abc"], "model.hidden_size: expected an integer"),
        (["model.hidden_size=100", "model.num_heads=3"], "not divisible by model.num_heads"),
        (["model.num_heads=4", "model.num_kv_heads=3"], "not a multiple of model.num_kv_heads"),
        (["model.num_layers=0"], "model.num_layers: must be positive"),
        (["optim.lr=-1"], "optim.lr: must be positive"),
        (["data.val_fraction=2"], "data.val_fraction: must be between 0 and 1"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["nonsense"], "expected section.key=value"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "mupfast.cli", "explain", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
    # a corpus that is not on this machine loads (explain works) and fails where the data is read
    args = ["data.corpus=/no/such/corpus", f"data.dir={tmp_path}/data"]
    assert (
        subprocess.run(
            [sys.executable, "-m", "mupfast.cli", "explain", *args], capture_output=True
        ).returncode
        == 0
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mupfast.cli", "prepare-data", *args], capture_output=True, text=True
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: data.corpus: path does not exist: /no/such/corpus"
    )


def test_explain_json_lists_every_parameter():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mupfast.cli",
            "explain",
            "--json",
            "model.hidden_size=64",
            "model.mup_base_hidden_size=32",
            "model.mup_base_filter_size=64",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    table = json.loads(proc.stdout)
    assert table["multipliers"]["m"] == 2.0
    q = next(r for r in table["rules"] if r["name"] == "blocks.0.attn.q.weight")
    assert q["lr_mult"] == 0.5
    assert torch.Size(q["shape"]) == (64, 64)


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_runs_through_deepspeeds_wrappers(tmp_path, stage):
    """bf16 is the GPU default: stage 0 uses DeepSpeed's bf16 DDP path, stage 1 its BF16_Optimizer."""
    overrides = [
        "train.steps=4",
        "train.precision=bf16",
        f"zero.stage={stage}",
        "model.mup_base_hidden_size=16",
        "model.mup_base_filter_size=64",
    ]
    cfg = tiny_config(*COMMON, *overrides, tmp_path=tmp_path)
    result = trainer.train(cfg)
    assert all(math.isfinite(v) for v in result.train_losses.values()) and len(result.train_losses) == 4
    rec = read_metrics(cfg.train.run_dir, "train")[-1]
    assert rec["lr/q"] == pytest.approx(rec["lr/embedding"] / 2)  # m = 32/16


def test_save_final_false_keeps_only_the_periodic_checkpoints(tmp_path):
    cfg = tiny_config(
        *COMMON, "train.steps=3", "train.save_every=2", "train.save_final=false", tmp_path=tmp_path
    )
    trainer.train(cfg)
    ckpts = Path(cfg.train.run_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step00000002"]
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    summary = json.loads((Path(cfg.train.run_dir) / "summary.json").read_text())
    assert summary["last_checkpoint_step"] == 2 and summary["steps"] == 3
