"""Metrics sinks of a run: JSON lines (the record tools read) and TensorBoard (what people look at).

Only rank 0 writes. Values may be floats or 0-dim tensors; tensors are converted here, once per
logging step, so the training loop never syncs with the device just to log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _plain(value) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    value = float(value)
    return value if math.isfinite(value) else float("nan")


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r.get("kind"), r.get("step"), r.get("event"))] = r
    rows = sorted(latest.values(), key=lambda r: r.get("step", 0))
    return [r for r in rows if kind is None or r.get("kind") == kind]
