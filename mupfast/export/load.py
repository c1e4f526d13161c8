"""Loading a trained run: its resolved config, its latest checkpoint's weights and its tokenizer.

:func:`load_run` rebuilds the model from ``RUN/config.yaml`` (with the structure its features add:
a fine-tune's adapters, :func:`mupfast.plugins.prepare_model`) and loads the latest DeepSpeed
checkpoint into it (ZeRO 0–2 from the one model-states file, ZeRO-3 consolidated with DeepSpeed's
``zero_to_fp32``), always with ``torch.load(weights_only=True)``. ``mupfast export`` and
``mupfast generate`` both start here; every problem is a :class:`~mupfast.errors.CheckpointError` or
:class:`~mupfast.config.ConfigError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import unittest.mock
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mupfast.config import Config, ModelConfig, config_from_dict, read_raw_config
from mupfast.config.validate import validate
from mupfast.distributed.checkpoint import deepspeed_checkpoint_types
from mupfast.errors import CheckpointError, ConfigError
from mupfast.model import Transformer
from mupfast.plugins import prepare_model
from mupfast.rundir import checkpoint_dir, latest_tag


@dataclass
class LoadedRun:
    """A run's resolved config and its model with the latest checkpoint's weights (eval mode)."""

    run_dir: Path
    cfg: Config
    model: Transformer
    checkpoint: Path
    """The checkpoint tag directory the weights came from."""
    step: int | None


def read_run_config(run_dir: str | Path, config: str | None = None, overrides: list[str] = ()) -> Config:
    """The resolved config of a run (``RUN/config.yaml``, or ``config`` when given) plus overrides.

    Keys that only matter while training (a corpus path, a ds_config file) are not checked here: a
    run exported on another machine must not fail because the training corpus is not there.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--run: run directory not found: {run_dir}")
    path = Path(config) if config else run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--run: {path} not found (not a run directory written by `mupfast train`?)")
    cfg = config_from_dict(read_raw_config(path, overrides))
    # Validate everything but the training-only paths (checked by `mupfast train`, not needed here).
    validate(
        replace(
            cfg,
            data=replace(cfg.data, prepared="", sources=[]),
            zero=replace(cfg.zero, ds_config=""),
        )
    )
    return cfg


def _load_weights_only(path: Path, **kwargs: Any) -> Any:
    """torch.load(weights_only=True); DeepSpeed's allow-listed types are imported only when present."""
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
            return torch.load(path, weights_only=True, **kwargs)


def _zero3_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-3 checkpoint with DeepSpeed's zero_to_fp32, still reading weights-only."""
    from deepspeed.utils import zero_to_fp32

    class _WeightsOnlyTorch:  # zero_to_fp32 calls torch.load(..., weights_only=False); refuse pickles
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, **kwargs):
            return _load_weights_only(Path(f), map_location=map_location, **kwargs)

    # zero_to_fp32 prints progress on stdout; keep stdout for our own output (generate streams there).
    with unittest.mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()):
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds; the user needs one line
                raise CheckpointError(
                    f"{ckpt_dir / tag}: cannot consolidate the ZeRO-3 checkpoint ({type(e).__name__}: {e}); "
                    f"try `python -m deepspeed.utils.zero_to_fp32 {ckpt_dir} OUT --tag {tag}`"
                ) from None


def read_checkpoint_weights(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path, int | None]:
    """The model state_dict of a run's latest checkpoint, its tag directory and step."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint (no 'latest' file); train the run first")
    tag_dir = ckpt_dir / tag
    # ZeRO 0–2 keep the whole module state_dict in mp_rank_00_model_states.pt; ZeRO-3 partitions it
    # over the ranks' zero_pp_rank_*_mp_rank_00_model_states.pt (empty "module" tensors there).
    full = tag_dir / "mp_rank_00_model_states.pt"
    zero3 = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    states = full if full.is_file() else (zero3[0] if zero3 else None)
    if states is None:
        raise CheckpointError(
            f"{tag_dir}: no model-states file (mp_rank_00_model_states.pt) in the checkpoint"
        )
    try:
        blob = _load_weights_only(states, mmap=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{states}: cannot read ({type(e).__name__}: {msg})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
        raise CheckpointError(f"{states}: holds no 'module' state_dict")
    step = blob.get("step") if isinstance(blob.get("step"), int) else None
    if states is full:
        return blob["module"], tag_dir, step
    return _zero3_state_dict(ckpt_dir, tag), tag_dir, step


def load_run(
    run_dir: str | Path,
    *,
    config: str | None = None,
    overrides: list[str] = (),
    device: torch.device | str = "cpu",
) -> LoadedRun:
    """Rebuild a run's model from its config.yaml and load the latest checkpoint's weights (fp32, eval)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, config, list(overrides))
    state, tag_dir, step = read_checkpoint_weights(run_dir)
    # "auto" backends: Triton only where there is CUDA (a run trained with triton loads on a CPU too).
    model_cfg = replace(cfg.model, attention_backend="auto", readout_backend="auto")
    with torch.device("meta"):
        model = Transformer(model_cfg)
        # The features' structure (a fine-tune's adapters): their weights are in the checkpoint too.
        prepare_model(model, replace(cfg, model=model_cfg), load_weights=False)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{tag_dir}: weights do not match the run config's model ({what})")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{tag_dir}: weights do not fit the run's model config ({first})") from None
    rebuild_buffers(model, cfg.model)
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, tag_dir, step)


def rebuild_buffers(model: Transformer, cfg: ModelConfig) -> None:
    """Non-persistent buffers (RoPE tables) are not in checkpoints; meta-built ones get real values."""
    from mupfast.model import Rotary

    for block in model.blocks:
        if block.attn.rotary is not None:
            block.attn.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


def run_tokenizer(cfg: Config, run_dir: Path | None = None):
    """The run's tokenizer: the copy the trainer saves in the run directory; for runs made before it
    saved one, byte-level, the BPE's tokenizer.json there, or the prepared data directory's."""
    from mupfast.data import BPETokenizer, ByteTokenizer, load_saved_tokenizer, prepare_sources

    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and (run_dir / "mupfast_tokenizer.json").is_file():
        return load_saved_tokenizer(run_dir)
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return BPETokenizer.load(run_dir / "tokenizer.json")
    return prepare_sources(cfg.data, progress=False)[0].tokenizer()  # cached by corpus fingerprint
