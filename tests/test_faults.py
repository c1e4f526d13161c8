"""Surviving faults: kill -9 and resume, crashes and full disks during checkpoint writes, a dying
rank, and bad input files — each either recovers exactly or stops with one line naming the file."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mupfast.train as trainer
from mupfast.distributed.engine import free_port
from mupfast.errors import CheckpointError
from mupfast.rundir import read_metrics
from tests.helpers import deepspeed_cmd, subprocess_env, tiny_config, write_config

FAST = ["train.log_every=1", "train.eval_every=0", "schedule.warmup_steps=2", "optim.lr=3e-3"]


def _train_cmd(cfg_file: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mupfast.cli", "train", "--config", cfg_file, *overrides]


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def _latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "training ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path):
    # Long enough after the step-6 checkpoint that the kill always lands mid-run, even on a fast machine.
    overrides = [*FAST, "train.steps=30", "train.save_every=3"]
    full = tiny_config(*overrides, tmp_path=tmp_path / "full")
    subprocess.run(
        _train_cmd(write_config(full, tmp_path / "full.yaml")),
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )

    cut = tiny_config(*overrides, tmp_path=tmp_path / "cut")
    cmd = _train_cmd(write_config(cut, tmp_path / "cut.yaml"))
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = Path(cut.train.run_dir) / "checkpoints" / "latest"
    _wait_for(lambda: latest.is_file() and latest.read_text().strip() >= "step00000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(cut.train.run_dir)) < 30  # it really was cut short
    subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    assert _losses(cut.train.run_dir) == _losses(full.train.run_dir)


def test_crash_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """The process dies after DeepSpeed wrote the step-4 model files but before the switch."""
    cfg = tiny_config(*FAST, "train.steps=6", "train.save_every=2", tmp_path=tmp_path)
    cfg_file = write_config(cfg, tmp_path / "c.yaml")
    script = (
        "import os, sys, torch\n"
        "real = torch.save\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    if 'step00000004' in str(f) and 'rng_rank' in str(f):\n"
        "        os._exit(9)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = dying_save\n"
        "from mupfast.cli import main\n"
        f"sys.exit(main(['train', '--config', {cfg_file!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, timeout=600
    )
    assert proc.returncode == 9
    assert _latest(cfg.train.run_dir) == "step00000002"
    proc = subprocess.run(
        _train_cmd(cfg_file), env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _latest(cfg.train.run_dir) == "step00000006"
    assert sorted(_losses(cfg.train.run_dir)) == list(range(1, 7))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_full_disk_or_unwritable_directory_reports_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, err
):
    cfg = tiny_config(*FAST, "train.steps=6", "train.save_every=2", tmp_path=tmp_path)
    import torch

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "step00000004" in str(f):
            raise OSError(err, os.strerror(err), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as info:
        trainer.train(cfg)
    message = str(info.value)
    assert "\n" not in message and os.strerror(err) in message
    assert "step00000002 is intact" in message
    ckpt = Path(cfg.train.run_dir) / "checkpoints"
    assert _latest(cfg.train.run_dir) == "step00000002" and not (ckpt / "step00000004").exists()


def test_bad_files_give_one_line_errors_naming_them_and_exit_2(tmp_path):
    cfg = tiny_config(*FAST, "train.steps=3", tmp_path=tmp_path)
    trainer.train(cfg)
    (prepared,) = Path(cfg.data.dir).glob("stdlib-*")
    cases = []

    truncated = tmp_path / "truncated"
    shutil.copytree(prepared, truncated)
    with open(truncated / "train-00000.bin", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "train-00000.bin") - 7)
    cases.append(([f"data.prepared={truncated}"], str(truncated / "train-00000.bin")))

    corrupted = tmp_path / "corrupted"
    shutil.copytree(prepared, corrupted)
    with open(corrupted / "val-00000.bin", "r+b") as f:
        f.write(b"garbage!")
    cases.append(([f"data.prepared={corrupted}"], str(corrupted / "val-00000.bin")))

    missing = tmp_path / "missing"
    shutil.copytree(prepared, missing)
    (missing / "train-00000.bin").unlink()
    cases.append(([f"data.prepared={missing}"], str(missing / "train-00000.bin")))

    run = Path(cfg.train.run_dir)
    (state,) = (run / "checkpoints" / "step00000003").glob("*model_states.pt")
    state.write_bytes(b"not a checkpoint")
    cases.append(([f"train.run_dir={run}", "train.steps=5"], "step00000003"))

    cfg_file = write_config(cfg, tmp_path / "c.yaml")
    for overrides, name in cases:
        proc = subprocess.run(
            _train_cmd(cfg_file, *overrides),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        assert len(errors) == 1 and name in errors[0], (overrides, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


def _two_nodes(cfg_file: str, tmp_path: Path, **popen) -> list[subprocess.Popen]:
    """Two 'nodes' on this machine: one `deepspeed --no_ssh --node_rank r` launcher each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    args = [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    return [
        subprocess.Popen(deepspeed_cmd(cfg_file, *args, "--node_rank", str(r)), env=subprocess_env(), **popen)
        for r in (0, 1)
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_dying_node_makes_the_other_exit_within_the_timeout(tmp_path):
    """Two 'nodes' on one machine; node 1 is killed; node 0 must not hang past dist_timeout_s."""
    cfg = tiny_config(
        *FAST, "train.steps=100000", "train.dist_timeout_s=20", "train.save_every=0", tmp_path=tmp_path
    )
    procs = _two_nodes(
        write_config(cfg, tmp_path / "c.yaml"),
        tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        metrics = Path(cfg.train.run_dir) / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, procs[0])
        os.killpg(procs[1].pid, signal.SIGKILL)  # the whole node: launcher and rank
        start = time.time()
        rc = procs[0].wait(timeout=20 + 60)
        assert rc != 0
        assert time.time() - start < 20 + 60
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_on_one_machine_match_the_single_process_losses(tmp_path):
    base = [*FAST, "train.steps=4", "train.micro_batch_size=2", "zero.stage=1"]
    single = trainer.train(tiny_config(*base, "train.grad_accum_steps=2", tmp_path=tmp_path / "single"))
    cfg = tiny_config(*base, tmp_path=tmp_path / "two")
    procs = _two_nodes(
        write_config(cfg, tmp_path / "c.yaml"),
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    two = _losses(cfg.train.run_dir)
    assert sorted(two) == sorted(single.train_losses)
    for step, loss in single.train_losses.items():
        assert two[step] == pytest.approx(loss, rel=2e-5), step
    assert json.loads((Path(cfg.train.run_dir) / "summary.json").read_text())["steps"] == 4


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_code_in_it_is_refused_not_executed(tmp_path):
    import torch

    cfg = tiny_config(*FAST, "train.steps=3", tmp_path=tmp_path)
    trainer.train(cfg)
    (state,) = (Path(cfg.train.run_dir) / "checkpoints" / "step00000003").glob("*model_states.pt")
    marker = tmp_path / "executed"
    torch.save({"module": _Payload(marker)}, state)
    with pytest.raises(CheckpointError, match="step00000003"):
        trainer.train(tiny_config(*FAST, "train.steps=5", tmp_path=tmp_path))
    assert not marker.exists()
