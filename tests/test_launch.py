"""The launch/ kit: ds_config templates merge cleanly, train.sh and slurm.sbatch really launch."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from mupfast.config import load_config
from mupfast.distributed.engine import ds_config
from mupfast.errors import ConfigError
from mupfast.rundir import read_metrics
from tests.helpers import ROOT, subprocess_env, tiny_config, write_config

LAUNCH = ROOT / "launch"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_templates_merge_over_our_config(stage):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"zero.ds_config={LAUNCH}/ds_zero{stage}.json", f"zero.stage={stage}"],
    )
    built = ds_config(cfg, world_size=4)
    assert built["zero_optimization"]["stage"] == stage
    assert built["gradient_clipping"] == 0.0 and "optimizer" not in built and "scheduler" not in built
    assert built["train_batch_size"] == cfg.train.micro_batch_size * 4
    assert not any(k.startswith("_") for k in built)
    if stage == 3:  # sub-groups must not split our per-component groups
        assert built["zero_optimization"]["sub_group_size"] >= 1e9


def test_ds_config_may_not_take_over_what_mupfast_owns(tmp_path):
    for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size", "bf16"):
        f = tmp_path / f"{key}.json"
        f.write_text(json.dumps({key: 1}))
        with pytest.raises(ConfigError, match=f"sets '{key}', which mupfast owns"):
            load_config(None, [f"zero.ds_config={f}"])


def test_scripts_parse():
    for script in ("train.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    proc = subprocess.run(["bash", str(LAUNCH / "train.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def _env_with_venv_python() -> dict[str, str]:
    import sys

    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHON"] = sys.executable
    return env


@pytest.mark.distributed
def test_train_sh_launches_a_run(tmp_path):
    cfg = tiny_config("train.steps=3", "schedule.warmup_steps=1", "train.log_every=1", tmp_path=tmp_path)
    cmd = ["bash", str(LAUNCH / "train.sh"), write_config(cfg, tmp_path / "c.yaml"), "optim.lr=2e-3"]
    proc = subprocess.run(
        cmd, env={**_env_with_venv_python(), "NUM_GPUS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metrics(cfg.train.run_dir, "train")) == 3
    assert read_metrics(cfg.train.run_dir, "train")[0]["lr/embedding"] == pytest.approx(2e-3 * 0.5)


@pytest.mark.distributed
def test_slurm_script_runs_one_launcher_per_node_under_fake_srun(tmp_path):
    """srun and scontrol replaced by shims: one 'node' at 127.0.0.1, so the script runs for real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    # srun's last two arguments are `bash -c CMD`: run them as node 0
    (bin_dir / "srun").write_text(
        '#!/bin/sh\nwhile [ "$1" != bash ]; do shift; done\nSLURM_NODEID=0 exec "$@"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cfg = tiny_config("train.steps=2", "schedule.warmup_steps=1", tmp_path=tmp_path)
    env = _env_with_venv_python()
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n0", SLURM_GPUS_ON_NODE="1"
    )
    cmd = ["bash", str(LAUNCH / "slurm.sbatch"), write_config(cfg, tmp_path / "c.yaml"), "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "runs" / "hostfile-4242").read_text() == "127.0.0.1 slots=1\n"
    assert len(read_metrics(cfg.train.run_dir, "train")) == 2
    assert os.path.isfile(Path(cfg.train.run_dir) / "summary.json")
