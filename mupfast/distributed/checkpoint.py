"""DeepSpeed checkpoints of a run: the engine's state on every rank, each rank's RNG, written aside.

A checkpoint is DeepSpeed's engine checkpoint on every rank plus each rank's RNG state and the
layout that wrote it; the data sampler is keyed by step, so the step in the client state is all it
needs. A resume on another layout goes through :mod:`mupfast.distributed.elastic`. Tags and ``latest`` are
the run directory's (:mod:`mupfast.rundir`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mupfast.errors import CheckpointError
from mupfast.optim.muon import MOMENTUM_KEY as MUON_MOMENTUM_KEY
from mupfast.rundir import checkpoint_tag, latest_tag, set_latest, write_checkpoint_layout


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, client_state: dict) -> str:
    """Engine checkpoint (every rank) + this rank's RNG state; returns the tag.

    Written aside, then switched: ``latest`` names the new tag only after every rank has finished
    writing, and is replaced atomically, so a crash or a full disk mid-write leaves the previous
    checkpoint as the one a resume loads.
    """
    import torch.distributed as dist

    tag = checkpoint_tag(step)
    previous = latest_tag(ckpt_dir) if (ckpt_dir / "latest").is_file() else None
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state={"step": step, **client_state}, save_latest=False
        )
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, ckpt_dir / tag / f"rng_rank{rank}.pt")
        if rank == 0:  # what a resume on another layout compares with (mupfast.distributed.elastic)
            layout = {
                "world_size": engine.dp_world_size,
                "zero_stage": int(engine.zero_optimization_stage()),
                "sequences_per_step": engine.train_batch_size(),
                "muon_momentum": MUON_MOMENTUM_KEY,  # where HyperP's momentum is (elastic: convertible)
            }
            write_checkpoint_layout(ckpt_dir, tag, layout)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            set_latest(ckpt_dir, tag)
    except (OSError, RuntimeError) as e:
        if rank == 0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # never leave a half-written tag behind
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        kept = (
            f"last good checkpoint {ckpt_dir / previous} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(f"cannot write checkpoint {ckpt_dir / tag} ({reason}); {kept}") from None
    return tag


def deepspeed_checkpoint_types() -> list[type]:
    """The three plain DeepSpeed types its checkpoint files hold besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(engine) -> None:
    """Make DeepSpeed read checkpoints with ``torch.load(weights_only=True)``.

    Anything in a checkpoint beyond tensors, containers and ``deepspeed_checkpoint_types()`` (a
    pickled callable, say) is refused instead of executed.
    """
    allowed = deepspeed_checkpoint_types()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def load_checkpoint(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Load a checkpoint into the engine and restore this rank's RNG; return the client state."""
    load_weights_only(engine)
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises many kinds here; the user needs one line
        raise CheckpointError(f"{ckpt_dir / tag}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if path is None or client is None or "step" not in client:
        raise CheckpointError(f"{ckpt_dir / tag}: checkpoint is incomplete or unreadable")
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return client
