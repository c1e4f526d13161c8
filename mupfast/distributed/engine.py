"""DeepSpeed setup: the process group and the ds_config we build.

Clipping and lr schedules are ours (``gradient_clipping: 0``, a client optimizer and scheduler), so
the ds_config holds only batch sizes, precision and ZeRO settings. Checkpoints:
:mod:`mupfast.distributed.checkpoint`.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

from mupfast.config import Config
from mupfast.config.validate import read_ds_overrides


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


def ds_config(cfg: Config, world_size: int, *, load_universal: bool = False) -> dict:
    """The DeepSpeed config of a run (no optimizer or scheduler sections: those are ours);
    ``load_universal``: the resume loads a universal checkpoint (mupfast.distributed.elastic)."""
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
    if load_universal:
        built["checkpoint"] = {"load_universal": True}
    if z.ds_config:
        built = _merge(built, read_ds_overrides(z.ds_config))
        built["zero_optimization"]["stage"] = z.stage  # zero.stage is the one switch for the stage
    return built
