"""The one owner of a run directory's files: every module reads and writes them through here.

A run directory holds::

    config.yaml            the resolved config the run trained with (written first)
    summary.json           how the run ended: steps, final losses, tokens/s, the rules version
    dispatch.json          the kernels ``auto`` chose per op and shape: timings, rejected and skipped candidates
    metrics.jsonl          one JSON record per logging step, eval and event (the record tools read)
    tensorboard/           the same scalars for TensorBoard (what people look at)
    tokenizer.json, mupfast_tokenizer.json   the tokenizer the run trained with
    checkpoints/<tag>/     DeepSpeed's checkpoint of a step (``step00001234``), one folder a step
    checkpoints/latest     the tag a resume loads; replaced atomically, only once a tag is complete
    checkpoints/<tag>/mupfast_layout.json   the world size, ZeRO stage and global batch that wrote it
    checkpoints/universal/<tag>/   its conversion to DeepSpeed's universal format (a resume on another layout)
    trial.yaml, train.log  a run launched as a child process: the config it was started with, its output
    configs/gen-GGG.yaml, logs/gen-GGG.log   the same per segment of a run trained in segments (PBT)

Metrics are written by rank 0 only. Values may be floats or 0-dim tensors; tensors are converted
here, once per logging step, so the training loop never syncs with the device just to log.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from mupfast.atomic import write_text_atomically
from mupfast.errors import CheckpointError

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
DISPATCH = "dispatch.json"


# ----------------------------------------------------------------------------------------------
# Config and summary


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def write_config(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Write the resolved config (``Config.to_dict()``), making the directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    config_path(run_dir).write_text(yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's config.yaml as a plain mapping, or None when it is missing or unreadable."""
    try:
        raw = yaml.safe_load(config_path(run_dir).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / SUMMARY).write_text(json.dumps(summary, indent=2))


def write_dispatch(run_dir: str | Path, decisions: list[dict[str, Any]]) -> None:
    """The dispatch decisions of this process (:func:`mupfast.ops.dispatch.decisions`), replacing the last
    written; nothing when there were none (off CUDA, or explicit backends)."""
    if decisions:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomically(Path(run_dir) / DISPATCH, json.dumps({"decisions": decisions}, indent=1) + "\n")


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when the run has not finished (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def launch_paths(run_dir: str | Path, *, segment: int | None = None) -> tuple[Path, Path]:
    """Where a launcher writes the config it starts a run's child process with, and the child's output:
    ``trial.yaml`` and ``train.log``, or for segment ``segment`` of a run trained in segments (PBT)
    ``configs/gen-GGG.yaml`` and ``logs/gen-GGG.log``."""
    run_dir = Path(run_dir)
    if segment is None:
        return run_dir / "trial.yaml", run_dir / "train.log"
    return run_dir / "configs" / f"gen-{segment:03d}.yaml", run_dir / "logs" / f"gen-{segment:03d}.log"


def grid_log_path(run_dir: str | Path) -> Path:
    """A grid point's output, beside its run directory (the directory is replaced when it reruns)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.log"


# ----------------------------------------------------------------------------------------------
# Metrics


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def _plain(value) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    value = float(value)
    return value if math.isfinite(value) else float("nan")


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self._tb = None

    def log(self, step: int, values: dict, kind: str = "train") -> dict:
        """Append one record; returns it with plain floats."""
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (optionally one kind: train, eval, event), in step order.

    A resumed run re-logs the steps after its last checkpoint; the latest record of a step wins.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r.get("kind"), r.get("step"), r.get("event"))] = r
    rows = sorted(latest.values(), key=lambda r: r.get("step", 0))
    return [r for r in rows if kind is None or r.get("kind") == kind]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def save_tokenizer(run_dir: str | Path, tokenizer) -> None:
    """The run carries its own tokenizer: export and generate read it from here."""
    tokenizer.save(run_dir)


def saved_tokenizer(run_dir: str | Path):
    """The tokenizer :func:`save_tokenizer` wrote, or None for a run made before runs kept one."""
    from mupfast.data import load_saved_tokenizer
    from mupfast.data.tokenizer import META_FILE

    return load_saved_tokenizer(run_dir) if (Path(run_dir) / META_FILE).is_file() else None


# ----------------------------------------------------------------------------------------------
# Checkpoint tags


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_tag(step: int) -> str:
    """The name of the checkpoint taken after ``step`` (its directory under checkpoints/)."""
    return f"step{step:08d}"


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Every tag directory under ``ckpt_dir``, oldest first."""
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    """Where ``tag``'s conversion to DeepSpeed's universal format lives (a resume on another layout)."""
    return ckpt_dir / "universal" / tag


#: Beside DeepSpeed's files in a tag: the layout that wrote it (world size, ZeRO stage, global batch).
LAYOUT_FILE = "mupfast_layout.json"


def write_checkpoint_layout(ckpt_dir: Path, tag: str, layout: dict) -> None:
    write_text_atomically(ckpt_dir / tag / LAYOUT_FILE, json.dumps(layout) + "\n")


def checkpoint_layout(ckpt_dir: Path, tag: str) -> dict | None:
    """The layout ``tag`` was written with; for a checkpoint from before it was recorded, the world size
    and stage its files show (None when they show neither)."""
    path = ckpt_dir / tag / LAYOUT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    optim = list((ckpt_dir / tag).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not optim:
        return None
    stage3 = (ckpt_dir / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    return {"world_size": len(optim), "zero_stage": 3 if stage3 else 2}


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names (None before the first checkpoint); an error if it is not there."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest}: names checkpoint {tag!r}, which does not exist")
    return tag


def set_latest(ckpt_dir: Path, tag: str) -> None:
    """Name ``tag`` the one a resume loads (atomically: the old name or the new one, never half)."""
    write_text_atomically(ckpt_dir / "latest", tag)


def rollback(ckpt_dir: Path, step: int) -> str | None:
    """Leave exactly the tag of ``step`` (none for step 0) as the latest; the problem, if any."""
    if step == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return None
    tag = checkpoint_tag(step)
    if not (ckpt_dir / tag).is_dir():
        return f"no checkpoint {ckpt_dir / tag} to resume from"
    latest = ckpt_dir / "latest"
    if not (latest.is_file() and latest.read_text().strip() == tag):
        set_latest(ckpt_dir, tag)
    for other in checkpoint_tags(ckpt_dir):
        if other > tag:
            shutil.rmtree(ckpt_dir / other, ignore_errors=True)
            shutil.rmtree(universal_dir(ckpt_dir, other), ignore_errors=True)
    return None


def keep_latest(ckpt_dir: Path) -> None:
    """Delete every tag but the one ``latest`` names (disk does not grow with a run's checkpoints)."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return
    keep = latest.read_text().strip()
    for other in checkpoint_tags(ckpt_dir):
        if other != keep:
            shutil.rmtree(ckpt_dir / other, ignore_errors=True)
    for other in (ckpt_dir / "universal").glob("*"):
        if other.name != keep:
            shutil.rmtree(other, ignore_errors=True)
    for tmp in ckpt_dir.glob(".copy-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def copy_checkpoint(src_run: str | Path, dst_run: str | Path, step: int) -> None:
    """``dst``'s checkpoints become exactly ``src``'s tag of ``step``, its latest (idempotent).

    Copied under a temporary name, then renamed: a crash mid-copy leaves ``dst``'s previous latest.
    """
    src, dst = checkpoint_dir(src_run), checkpoint_dir(dst_run)
    tag = checkpoint_tag(step)
    if not (src / tag).is_dir():
        raise FileNotFoundError(f"the source checkpoint {src / tag} is missing")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".copy-{uuid.uuid4().hex[:8]}"
    shutil.copytree(src / tag, tmp)
    shutil.rmtree(dst / tag, ignore_errors=True)
    tmp.rename(dst / tag)
    set_latest(dst, tag)
    keep_latest(dst)
