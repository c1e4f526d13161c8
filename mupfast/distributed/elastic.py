"""Resuming on another number of ranks or ZeRO stage, through DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds each rank's partition of the optimizer state, so it loads only at the world
size and stage that wrote it. When the latest checkpoint was written otherwise, rank 0 converts it
once with DeepSpeed's ``ds_to_universal`` (a child process) into ``checkpoints/universal/<tag>/``,
under a temporary name renamed when complete, the original untouched; the other ranks wait for the
rename. The engine then loads it with ``checkpoint.load_universal``, which re-partitions every
parameter's fp32 weights and Adam moments by name for the new layout. The step, the RNG and the data
position come along (the sampler is a function of seed, step and global micro-batch index), and the
μP group hyperparameters are the config's, as on any resume.

HyperP comes along too: Muon keeps its momentum under Adam's ``exp_avg`` (and its checkpoints a zero
``exp_avg_sq`` beside it, which the converter also reads), so DeepSpeed re-partitions it like an Adam
moment; the sphere radii, one number per matrix that the converter has no place for, are read again
from the restored weights at the first step (the projection holds every ‖W‖ at its radius, to fp32
rounding). What DeepSpeed's converter cannot carry is refused in one line: ZeRO-0 checkpoints (no
partitions to convert), and HyperP checkpoints written before Muon's momentum was kept as ``exp_avg``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mupfast.config import Config
from mupfast.distributed.checkpoint import load_checkpoint
from mupfast.distributed.zero_shards import group_partitions
from mupfast.errors import CheckpointError
from mupfast.optim.muon import MOMENTUM_KEY as MUON_MOMENTUM_KEY
from mupfast.rundir import checkpoint_layout, universal_dir

log = logging.getLogger("mupfast")

#: Written inside a finished universal folder: the source tag and every parameter it must hold.
MARKER = "mupfast_universal.json"


@dataclass
class ResumePlan:
    tag: str
    """What ``engine.load_checkpoint`` loads, relative to checkpoints/ (``universal/<tag>`` when converted)."""
    universal: bool
    saved: dict | None
    """The layout the checkpoint was written with (world_size, zero_stage, sequences_per_step)."""


def plan_resume(cfg: Config, world: int, ckpt_dir: Path, tag: str) -> ResumePlan:
    """Load ``tag`` as it is, or through its universal conversion when the layout changed."""
    saved = checkpoint_layout(ckpt_dir, tag)
    stage = cfg.zero.stage
    if saved is None or (saved["world_size"], saved["zero_stage"]) == (world, stage):
        return ResumePlan(tag, False, saved)
    if (
        saved["zero_stage"] == 0 and stage == 0
    ):  # every rank holds the whole optimizer: any world size loads it
        return ResumePlan(tag, False, saved)
    written = f"written by {saved['world_size']} rank(s) at ZeRO-{saved['zero_stage']}"
    if saved["zero_stage"] == 0 or stage == 0:
        raise CheckpointError(
            f"{ckpt_dir / tag}: {written}; DeepSpeed's universal checkpoints convert between ZeRO stages 1–3 "
            f"only: resume at zero.stage={saved['zero_stage']} (any number of ranks"
            f"{' at ZeRO-0' if saved['zero_stage'] == 0 else ''}) or on {saved['world_size']} rank(s)"
        )
    if cfg.model.parametrization == "hyperp" and saved.get("muon_momentum") != MUON_MOMENTUM_KEY:
        raise CheckpointError(
            f"{ckpt_dir / tag}: {written}, before HyperP's Muon momentum was kept where DeepSpeed's "
            f"universal converter reads it: resume on {saved['world_size']} rank(s) at "
            f"zero.stage={saved['zero_stage']} until the next checkpoint, which converts"
        )
    return ResumePlan(f"universal/{tag}", True, saved)


@contextmanager
def keep_group_settings(optimizer):
    """The optimizer's groups (μP multipliers, names, hyperparameters, parameters) as they were built
    from the config, whatever a universal load writes over them: DeepSpeed's loaders copy the saved
    groups' settings back (ZeRO-3: the first group's into every group, and no parameters). Each
    parameter's step count is its own tensor afterwards."""
    saved = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, saved, strict=True):
        for key in [k for k in group if k not in settings]:
            del group[key]
        group.update(settings)  # the parameters too: ZeRO-3's loader empties every group's list
    for state in optimizer.state.values():  # ZeRO-3's loader gives every parameter the same step tensor,
        step = state.get("step")  # which an in-place increment would then advance once per parameter
        if hasattr(step, "clone"):
            state["step"] = step.clone()


def load_buffers(module, folder: Path) -> None:
    """The module's buffers from the universal folder's engine state: DeepSpeed's universal load restores
    the parameters the optimizer holds and nothing else (AdaLoRA's rank masks and importance scores
    are buffers)."""
    import torch

    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
        "module"
    ]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved and saved[name].shape == buffer.shape:
                buffer.copy_(saved[name])


def prepare_resume(cfg: Config, rank: int, world: int, ckpt_dir: Path, tag: str) -> ResumePlan:
    """The plan for resuming ``tag``; on another layout, said in the log and the conversion made."""
    plan = plan_resume(cfg, world, ckpt_dir, tag)
    if plan.universal:
        if rank == 0:
            explain_resume(plan, cfg, world, ckpt_dir)
        ensure_universal(ckpt_dir, tag, rank, cfg.train.dist_timeout_s)
    return plan


def load_resume(engine, optimizer, ckpt_dir: Path, plan: ResumePlan, rank: int) -> dict:
    """Load the planned checkpoint into the engine; the client state. Through a universal conversion,
    what DeepSpeed's universal load overwrites or leaves out is put back (the groups, the buffers)."""
    if not plan.universal:
        return load_checkpoint(engine, ckpt_dir, plan.tag, rank)
    with keep_group_settings(optimizer):
        client = load_checkpoint(engine, ckpt_dir, plan.tag, rank)
    optimizer.tidy_muon_state(group_partitions(engine.optimizer) or None)
    # The converter keeps per-element state only: each sphere radius is ‖W‖ again at the first step
    # (sphere_step), where the projection held it.
    for state in optimizer.state.values():
        state.pop("radius", None)
    load_buffers(engine.module, ckpt_dir / plan.tag)
    return client


def explain_resume(plan: ResumePlan, cfg: Config, world: int, ckpt_dir: Path) -> None:
    """The log lines of a resume through a universal conversion (rank 0)."""
    s = plan.saved
    log.info(
        "resuming %s, written by %d rank(s) at ZeRO-%d, on %d rank(s) at ZeRO-%d through DeepSpeed's universal "
        "checkpoint %s",
        Path(plan.tag).name,
        s["world_size"],
        s["zero_stage"],
        world,
        cfg.zero.stage,
        ckpt_dir / plan.tag,
    )
    now = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    if s.get("sequences_per_step") not in (None, now):
        log.warning(
            "the global batch changed from %d to %d sequences a step: the run goes on at the same step of its "
            "schedule, each step now training on %d× the tokens it did",
            s["sequences_per_step"],
            now,
            now / s["sequences_per_step"],
        )


def ensure_universal(ckpt_dir: Path, tag: str, rank: int, timeout_s: float) -> Path:
    """The universal conversion of ``tag``: made by rank 0 if missing, waited for by the others."""
    final = universal_dir(ckpt_dir, tag)
    if rank == 0 and not final.is_dir():
        _convert(ckpt_dir / tag, final)
    deadline = time.monotonic() + timeout_s
    while not final.is_dir():
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{final}: rank 0 did not finish converting {ckpt_dir / tag} in {timeout_s:.0f} s"
            )
        time.sleep(0.5)
    check_universal(final)
    return final


def _convert(src: Path, final: Path) -> None:
    """ds_to_universal into a temporary folder, renamed to ``final`` only once complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # a conversion that crashed or was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(src), "--output_folder", str(tmp),
        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]  # fmt: skip
    log.info("converting %s to DeepSpeed's universal format (once) ...", src)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(
            f"{src}: DeepSpeed's universal conversion failed ({last}); the checkpoint is untouched"
        )
    _serve_every_stage(tmp)
    for rng in src.glob("rng_rank*.pt"):  # each rank's RNG, read from the folder the engine loads
        shutil.copyfile(rng, tmp / rng.name)
    params = {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp / "zero").iterdir() if p.is_dir()}
    (tmp / MARKER).write_text(json.dumps({"source": src.name, "params": params}) + "\n")
    os.replace(tmp, final)


def _serve_every_stage(folder: Path) -> None:
    """Let DeepSpeed's ZeRO-1/2 and ZeRO-3 loaders both read what either converter wrote.

    The converters write the parts that do not depend on the stage (weights and moments per
    parameter) alike, but name the engine state file and lay out the global optimizer state as their
    own stage reads them: ``mp_rank_00_model_states.pt`` and a flat ``optimizer_state.pt`` (1/2), or
    ``zero_pp_rank_0_…`` and the state under ``optimizer_state_dict`` (3). Nothing is re-partitioned
    here: both names and both layouts are written, holding the same values.
    """
    import torch

    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    present = [n for n in names if (folder / n).is_file()]
    for name in names:
        if present and name not in present:
            shutil.copyfile(folder / present[0], folder / name)
    path = folder / "zero" / "optimizer_state.pt"
    sd = torch.load(path, map_location="cpu", weights_only=False)
    nested = sd.get("optimizer_state_dict")
    groups = sd.get("param_groups") or (nested or {}).get("param_groups")
    if nested is None:  # written from ZeRO-1/2: the step of any parameter (every one has the same)
        step = next(
            (torch.load(f, weights_only=False) for f in sorted((folder / "zero").glob("*/step.pt"))), 0
        )
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups}
    else:  # written from ZeRO-3: flat tensors and no step per parameter, as the ZeRO-1/2 loader needs them
        _shape_fragments(folder, nested["state"][0]["step"])
    sd.setdefault("param_groups", groups)
    sd.setdefault("ds_version", __import__("deepspeed").__version__)
    torch.save(sd, path)


def _shape_fragments(folder: Path, step) -> None:
    """Each parameter's weights and moments in its own shape, its step, and the engine state's module
    (ZeRO-3 keeps only this rank's empty placeholders there) rebuilt from the weights."""
    import torch

    engine_file = folder / "mp_rank_00_model_states.pt"
    engine_state = torch.load(engine_file, weights_only=False)
    shapes = {name: shape for group in engine_state["param_shapes"] for name, shape in group.items()}
    module = engine_state["module"]
    for param_dir in (folder / "zero").iterdir():
        if not param_dir.is_dir() or param_dir.name not in shapes:
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param_dir / f"{key}.pt"
            if f.is_file():
                d = torch.load(f, weights_only=False)
                d = d if isinstance(d, dict) else {"param": d}  # ZeRO-3's converter saves bare tensors
                d["param"] = d["param"].reshape(shapes[param_dir.name])
                torch.save(d, f)
                if key == "fp32" and param_dir.name in module:
                    module[param_dir.name] = d["param"]
        if not (param_dir / "step.pt").is_file():
            torch.save(step, param_dir / "step.pt")
    for name, source in (engine_state.get("shared_params") or {}).items():  # a tied readout
        module[name] = module[source]
    torch.save(engine_state, engine_file)


def check_universal(folder: Path) -> None:
    """A universal folder is complete: its marker, and every file the conversion wrote for each parameter."""
    marker = folder / MARKER
    try:
        params = json.loads(marker.read_text())["params"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(
            f"{folder}: not a complete universal checkpoint (no readable {MARKER}); delete it to convert again"
        ) from None
    for name, files in params.items():
        missing = [f for f in files if not (folder / "zero" / name / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: truncated universal checkpoint ({name} lacks {', '.join(missing)}); delete it to "
                "convert again"
            )
