"""mupfast's training loop does not wait for the device on a step it does not log: no ``.item()``,
``bool(tensor)``, ``.tolist()``, ``.cpu()``… from our code. A non-finite step is still skipped on
every rank and counted, the host learning of it at the next logging step.

On CPU nothing really waits, so the test catches the calls themselves: every Tensor method that
would block on a GPU is wrapped, and a call made from a mupfast source file on a non-logging step
(after the first two, which build cached launch plans) fails the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mupfast
import mupfast.kernels
import mupfast.train as trainer
from mupfast.data import BatchSampler
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config

OURS = (str(Path(mupfast.__file__).parent), *map(str, mupfast.kernels.__path__))  # kernels: a namespace
DATA = str(Path(mupfast.__file__).parent / "data")  # host-side token arrays, never on the device
SYNCING = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"]
STEPS, LOG_EVERY = 8, 8


def _watch(monkeypatch, calls: list, current: dict) -> None:
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS) and not caller.startswith(DATA) and current["quiet"]:
                calls.append((current["step"], _name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    batch = BatchSampler.batch

    def batch_at(self, step, index):  # the trainer asks for step s's data when step s begins
        current["step"] = step
        current["quiet"] = 2 <= step and (step + 1) % LOG_EVERY != 0 and step + 1 != STEPS
        return batch(self, step, index)

    monkeypatch.setattr(BatchSampler, "batch", batch_at)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.attention_backend=torch", "data.document_masking=true"],
        ["model.attention_backend=triton", "model.readout_backend=triton", "optim.backend=triton"],
        ["model.parametrization=hyperp"],
    ],
    ids=["torch-packed", "triton", "hyperp"],
)
def test_no_host_sync_on_a_step_that_is_not_logged(tmp_path, monkeypatch, overrides):
    calls: list = []
    current = {"step": 0, "quiet": False}
    cfg = tiny_config(
        *overrides,
        f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        "train.eval_every=0",
        "train.save_final=false",
        "train.grad_accum_steps=2",
        tmp_path=tmp_path,
    )
    _watch(monkeypatch, calls, current)
    result = trainer.train(cfg)
    assert result.steps == STEPS
    assert not calls, "host syncs on non-logging steps: " + "; ".join(
        f"step {s}: .{n}() at {Path(f).name}:{line}" for s, n, f, line in calls
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_no_synchronising_cuda_call_from_mupfast_on_a_quiet_step(tmp_path, monkeypatch):
    """The same on a GPU with torch's own detector: every synchronising CUDA call warns, and none
    may come from mupfast's code (DeepSpeed's own are not ours to judge) on a non-logging step."""
    import warnings

    cfg = tiny_config(
        "model.attention_backend=triton",
        f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        "train.eval_every=0",
        "train.save_final=false",
        tmp_path=tmp_path,
    )
    batch = BatchSampler.batch

    def batch_at(self, step, index):
        quiet = 2 <= step and step + 1 < STEPS
        torch.cuda.set_sync_debug_mode("warn" if quiet else "default")
        return batch(self, step, index)

    monkeypatch.setattr(BatchSampler, "batch", batch_at)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "synchroniz" in str(w.message) and w.filename.startswith(OURS)]
    assert not ours, [(Path(w.filename).name, w.lineno, str(w.message)[:80]) for w in ours]


def test_nonfinite_steps_are_counted_at_the_next_logging_step_and_stop_the_run(tmp_path, monkeypatch):
    """Steps 3 and 6–8 give a NaN loss; the host syncs only every 4th step, yet every skipped step
    is logged with its own number, the run stops where the third in a row came, and the updates of
    the skipped steps were not applied."""
    cfg = tiny_config(
        "train.steps=12",
        "train.log_every=4",
        "train.eval_every=0",
        "train.save_every=4",
        "train.max_nonfinite_in_row=3",
        tmp_path=tmp_path,
    )
    real_build = trainer.build_model
    calls = {"n": 0}

    def poisoned(model_cfg):
        model = real_build(model_cfg)
        forward = model.forward

        def forward_nan_on_some_steps(tokens, targets=None, **kw):
            out = forward(tokens, targets, **kw)
            if targets is not None and model.training:
                calls["n"] += 1
                if calls["n"] in (3, 6, 7, 8):
                    return out * float("nan")
            return out

        model.forward = forward_nan_on_some_steps
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    with pytest.raises(trainer.TrainingError, match=r"3 non-finite losses in a row at step 8"):
        trainer.train(cfg)
    events = read_metrics(cfg.train.run_dir, "event")
    assert [e["step"] for e in events] == [3, 6, 7, 8]
    assert [e["skipped_steps"] for e in events] == [1, 2, 3, 4]
    train = read_metrics(cfg.train.run_dir, "train")
    assert [r["step"] for r in train] == [4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # Step 8 (a checkpoint step) had its update skipped: the last checkpoint is step 4's.
    assert (Path(cfg.train.run_dir) / "checkpoints" / "latest").read_text().strip() == "step00000004"
