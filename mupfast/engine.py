"""DeepSpeed plumbing: process-group setup, the ds_config we build, and checkpoints.

Clipping and lr schedules are ours (``gradient_clipping: 0``, a client optimizer and scheduler), so
the ds_config holds only batch sizes, precision and ZeRO settings. Checkpoints are DeepSpeed's
engine checkpoint on every rank plus each rank's RNG state; the data sampler is keyed by step, so
the step in the client state is all it needs.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from pathlib import Path

import torch

from mupfast.atomic import write_text_atomically
from mupfast.config import Config
from mupfast.config_validate import read_ds_overrides
from mupfast.errors import CheckpointError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Join (or create, outside the launcher) the process group; return (rank, local_rank, world)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m mupfast.train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "gloo":
            _unlink_shm_buffer(dist)
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


def _unlink_shm_buffer(dist) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer once every rank has mapped it.

    DeepSpeed's shared-memory comm op (ranks on one host) creates a 64 MiB POSIX shm file per rank
    and never unlinks it, so every CPU run left one in /dev/shm: RAM that stays taken until reboot
    (hundreds of runs in a test session or a PBT study fill the machine). The mappings stay valid
    after the unlink; the memory goes when the last rank exits.
    """
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
        f"_{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    if dist.get_world_size() > 1:
        dist.barrier()  # every peer has opened this rank's buffer (DeepSpeed's init waits for all of them)
    try:
        os.unlink(name)
    except FileNotFoundError:  # ranks on several hosts: DeepSpeed made no buffer
        pass


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of a run (no optimizer or scheduler sections: those are ours)."""
    t, z = cfg.train, cfg.zero
    zero: dict = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    bf16 = use_bf16(cfg)
    built = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; clipping is per group, in our optimizer
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # fp32 gradient accumulation under ZeRO; at stage 0 DeepSpeed only supports bf16 grads with a
        # bf16 model (its DDP_BFLOAT16 path, which keeps fp32 master weights for our optimizer).
        "data_types": {"grad_accum_dtype": "fp32"} if bf16 and z.stage >= 1 else {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if z.ds_config:
        built = _merge(built, read_ds_overrides(z.ds_config))
        built["zero_optimization"]["stage"] = z.stage  # zero.stage is the one switch for the stage
    return built


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest}: names checkpoint {tag!r}, which does not exist")
    return tag


def checkpoint_tag(step: int) -> str:
    """The name of the checkpoint taken after ``step`` (its directory under checkpoints/)."""
    return f"step{step:08d}"


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
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            write_text_atomically(ckpt_dir / "latest", tag)
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
