"""Small builders shared by the tests."""

from __future__ import annotations

from mupfast.config import Config, load_config


def tiny_config(*overrides: str, tmp_path=None) -> Config:
    """A model small enough for many CPU runs per test file, with any overrides applied."""
    base = [
        "model.vocab_size=256",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.filter_size=64",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.progress=false",
        "train.eval_batches=2",
        "data.max_corpus_bytes=300000",
    ]
    if tmp_path is not None:
        base += [f"train.run_dir={tmp_path}/run", f"data.dir={tmp_path}/data"]
    return load_config(None, [*base, *overrides])


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: our checkout importable, DeepSpeed on its CPU accelerator."""
    import os

    # An in-process run earlier in the session leaves its rendezvous variables in os.environ; a child
    # that inherited them would try to bind the same port.
    rendezvous = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


def compiled_env() -> dict[str, str]:
    """``subprocess_env`` without the Triton interpreter: kernels compile, and autotuners keep every config
    their pruner keeps for a GPU."""
    return {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}


def write_config(cfg: Config, path) -> str:
    """Write a resolved config as YAML for a child process; returns the path as a string."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def deepspeed_cmd(cfg_file: str, *launcher_args: str, module: str = "mupfast.train") -> list[str]:
    """The deepspeed launcher running ``mupfast.train`` (or a wrapper ``module``) on a config file."""
    import sys

    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        *launcher_args,
        "--module",
        module,
        "--config",
        cfg_file,
    ]


def train_on_ranks(cfg: Config, ranks: int, config_path, **popen):
    """Train ``cfg`` on ``ranks`` CPU ranks under the deepspeed launcher; the finished process.

    Extra keyword arguments go to ``subprocess.run`` (or, with ``popen=True``, to ``Popen``, whose
    process is returned running)."""
    import subprocess

    from mupfast.distributed.engine import free_port

    cmd = deepspeed_cmd(
        write_config(cfg, config_path), "--num_gpus", str(ranks), "--master_port", str(free_port())
    )
    if popen.pop("popen", False):
        return subprocess.Popen(cmd, env=subprocess_env(), **popen)
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, **popen)


def run_bench_smoke(module: str, name: str, out_dir) -> dict:
    """Run ``python -m benchmarks.<module> --smoke --out DIR`` on CPU; return its JSON (meta + rows)."""
    import json
    import subprocess
    import sys

    env = {**subprocess_env(), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--smoke", "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (json_path,) = out_dir.glob(f"*-{name}.json")
    assert json_path.with_suffix(".md").is_file()
    return json.loads(json_path.read_text())


def crash_after_checkpoint_then_resume(cfg: Config, crash_step: int, monkeypatch):
    """Train until the checkpoint of ``crash_step`` is written, crash, then run the same config again."""
    import pytest

    import mupfast.train as trainer

    real_save = trainer.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(engine, ckpt_dir, step, rank, client_state):
        tag = real_save(engine, ckpt_dir, step, rank, client_state)
        if step == crash_step:
            raise Crash
        return tag

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    return trainer.train(cfg)  # resumes from crash_step


def assert_resume_is_bitwise(
    overrides: list[str], tmp_path, monkeypatch, *, steps: int, crash_step: int
) -> None:
    """A run cut after the checkpoint of ``crash_step`` and resumed logs the uninterrupted run's losses bit for bit."""
    from mupfast.rundir import read_metrics

    full = tiny_config(*overrides, tmp_path=tmp_path / "full")
    import mupfast.train as trainer

    trainer.train(full)
    cut = tiny_config(*overrides, tmp_path=tmp_path / "cut")
    crash_after_checkpoint_then_resume(cut, crash_step, monkeypatch)
    a = {r["step"]: r["loss"] for r in read_metrics(full.train.run_dir, "train")}
    b = {r["step"]: r["loss"] for r in read_metrics(cut.train.run_dir, "train")}
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step] == a[step], step
