"""The training loop: ``mupfast train``, and ``python -m mupfast.train`` under the deepspeed launcher.

Read top to bottom: :func:`setup` joins the ranks, opens the data, builds the μP model, optimizer
and schedule, hands them to DeepSpeed and resumes from the latest checkpoint; :func:`train_step`
does one optimizer step; :func:`train` loops over the steps, logging, evaluating and checkpointing
on the steps that sync with the device anyway. Features (fine-tuning) take part through the hooks
of :mod:`mupfast.plugins`; the run directory's files are :mod:`mupfast.rundir`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mupfast import rundir
from mupfast.config import Config, load_config
from mupfast.data import BatchSampler, prepare_sources
from mupfast.data.packing import packed_inputs
from mupfast.distributed.activation_checkpoint import apply_activation_checkpointing
from mupfast.distributed.checkpoint import save_checkpoint
from mupfast.distributed.compile import compile_blocks
from mupfast.distributed.elastic import load_resume, prepare_resume
from mupfast.distributed.engine import ds_config, init_distributed
from mupfast.distributed.zero_shards import attach as attach_to_zero
from mupfast.errors import ConfigError, TrainingError
from mupfast.model import build_model
from mupfast.model.flops import flops_per_token, throughput_metrics
from mupfast.ops import dispatch
from mupfast.optim import build_optimizer
from mupfast.parametrization import RULES_VERSION
from mupfast.plugins import TrainerHooks, prepare_model
from mupfast.progress import progress_bar


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    skipped_steps: int = 0


def _nonfinite_anywhere(loss: torch.Tensor) -> torch.Tensor:
    """A device flag, set on every rank iff the loss is non-finite on some rank (one tiny collective,
    no host sync)."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


class SkippedSteps:
    """The steps whose update was skipped, learnt by the host only when it syncs anyway.

    Each step's device flag is kept until :meth:`read` (a logging, eval or checkpoint step) fetches
    them all in one transfer; then the run's count and the current run of skipped steps are known,
    and the stop-after-N rule is applied at the step where the N-th came.
    """

    def __init__(self, limit: int):
        self.limit, self.total, self.in_row = limit, 0, 0
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, flag: torch.Tensor) -> None:
        self._pending.append((step, flag))

    def read(self) -> tuple[list[tuple[int, int]], int | None]:
        """(each skipped step since the last read with the run's count up to it, the step where
        ``limit`` in a row was reached or None); steps after that one are not counted: the run
        stops there."""
        if not self._pending:
            return [], None
        steps = [s for s, _ in self._pending]
        flags = torch.cat([f for _, f in self._pending]).tolist()  # the one host sync
        self._pending.clear()
        skipped = []
        for step, bad in zip(steps, flags):
            self.in_row = self.in_row + 1 if bad else 0
            if bad:
                self.total += 1
                skipped.append((step, self.total))
                if self.in_row >= self.limit:
                    return skipped, step
        return skipped, None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on the device without waiting: a blocking copy to CUDA synchronises the stream,
    so it goes through pinned memory and is queued behind the work already submitted."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _mean_over_ranks(x: float) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / dist.get_world_size()
    return x


def _source_names(data) -> list[str]:
    """A metrics name per mixture source: its corpus's file stem, made unique."""
    names: list[str] = []
    for i, s in enumerate(data.sources):
        corpus = s.prepared or (s.corpus if isinstance(s.corpus, str) else s.corpus[0])
        stem = Path(corpus.rstrip("/")).name.split("*")[0].split(".")[0] or f"source{i}"
        names.append(stem if stem not in names else f"{stem}{i}")
    return names


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Trainer:
    """Everything a run needs between its steps, as :func:`setup` leaves it."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    engine: Any
    optimizer: Any  # DeepSpeed's view of it: its param_groups carry this step's lrs
    client_opt: Any  # ours (ClipAdamW): per-group norms, clip coefficients, the skip flag
    train_sampler: BatchSampler
    val_sampler: BatchSampler
    packed: Callable[[torch.Tensor], dict]
    hooks: TrainerHooks
    source_names: list[str]
    start: int = 0
    resumed_from: Path | None = None

    @property
    def ckpt_dir(self) -> Path:
        return rundir.checkpoint_dir(self.run_dir)


def _open_data(cfg: Config, rank: int, world: int, run_dir: Path):
    """The batch samplers and the tokenizer's EOS: rank 0 prepares the data (cached by fingerprint),
    the others wait and then open the same shards."""
    t = cfg.train
    if rank == 0:
        sources = prepare_sources(cfg.data, progress=t.progress)
    if world > 1:
        dist.barrier()
    if rank != 0:
        sources = prepare_sources(cfg.data, progress=False)
    tokenizer = sources[0].tokenizer()
    if rank == 0:
        rundir.save_tokenizer(run_dir, tokenizer)
    if sources[0].vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({sources[0].vocab_size})"
        )
    # A batch is a pure function of (seed, step, global micro-batch index), not of the rank: the same
    # global batch whatever the split into ranks × accumulation steps, and a resume needs only the step.
    common = dict(
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        weights=[s.weight for s in cfg.data.sources] or None,
    )
    train_sampler = BatchSampler(
        [s.train_set() for s in sources],
        micro_batches_per_step=t.grad_accum_steps * world,
        sampling=cfg.data.sampling,
        **common,
    )
    val_sampler = BatchSampler([s.val_set() for s in sources], **common)
    return train_sampler, val_sampler, tokenizer.eos_id


def _build_engine(cfg: Config, world: int, load_universal: bool = False):
    """The μP model, our optimizer and schedule, handed to DeepSpeed; the features' hooks."""
    import deepspeed

    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    hooks = prepare_model(model, cfg)  # features: fine-tuning's base weights and adapters
    apply_activation_checkpointing(model, t.activation_checkpointing, t.checkpoint_every)
    if t.compile:
        compile_blocks(model)
    # every group's lr is base · schedule(t) · lr_mult, set by the optimizer's GroupLR (hyperp's base
    # η counts every rank's tokens in its batch)
    optimizer = build_optimizer(model, cfg, world_size=world, reduce_norms=cfg.zero.stage >= 1)
    if cfg.zero.stage == 3 and cfg.model.tie_embeddings:
        deepspeed.zero.register_external_parameter(model.readout, model.tok_emb.weight)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=optimizer.lr_schedule,
        config=ds_config(cfg, world, load_universal=load_universal),
    )
    client_opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    attach_to_zero(engine, client_opt)  # ZeRO: one collective for all groups' norms; Muon's matrix layout
    return engine, optimizer, client_opt, hooks


def setup(cfg: Config) -> Trainer:
    """Join the ranks, open the data, build the engine, and resume from the latest checkpoint."""
    t = cfg.train
    rank, local_rank, world = init_distributed(t.dist_timeout_s)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(t.run_dir)
    if rank == 0:
        rundir.write_config(run_dir, cfg.to_dict())
        # Every kernel choice of `auto` (and a candidate's device fault) in dispatch.json as it is made.
        dispatch.on_decision(lambda decisions: rundir.write_dispatch(run_dir, decisions))
    train_sampler, val_sampler, eos_id = _open_data(cfg, rank, world, run_dir)
    ckpt_dir = rundir.checkpoint_dir(run_dir)
    tag = rundir.latest_tag(ckpt_dir) if t.resume else None
    plan = prepare_resume(cfg, rank, world, ckpt_dir, tag) if tag is not None else None
    engine, optimizer, client_opt, hooks = _build_engine(cfg, world, plan is not None and plan.universal)
    train_sampler, val_sampler = hooks.samplers(train_sampler, val_sampler)  # prompt/completion: loss masks
    tr = Trainer(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        run_dir=run_dir,
        engine=engine,
        optimizer=optimizer,
        client_opt=client_opt,
        train_sampler=train_sampler,
        val_sampler=val_sampler,
        packed=packed_inputs(cfg.data, eos_id),
        hooks=hooks,
        source_names=_source_names(cfg.data) if len(cfg.data.sources) > 1 else [],
    )
    if plan is not None:
        tr.start = int(load_resume(engine, client_opt, tr.ckpt_dir, plan, rank)["step"])
        tr.resumed_from = tr.ckpt_dir / tag
        # The config's hyperparameters, not the checkpoint's (ClipAdamW.load_state_dict puts back the
        # configured betas, eps, weight decay and clip thresholds; a PBT member resumes with the values
        # explore gave it), and the lrs recomputed from lr_mult at the resumed step.
        client_opt.lr_schedule.load_state_dict({"last_step": tr.start})
    return tr


# ----------------------------------------------------------------------------------------------
# One step


@torch.no_grad()
def evaluate(tr: Trainer, n_batches: int) -> float:
    tr.engine.eval()
    losses = []
    for x, y in tr.val_sampler.eval_batches(n_batches):
        x, y = to_device(x, tr.device), to_device(y, tr.device)
        losses.append(tr.engine(x, y, **tr.packed(x)).float().item())
    tr.engine.train()
    return sum(losses) / len(losses)


def train_step(tr: Trainer, step: int, *, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the step's micro-batches, then the update (skipped on every rank alike
    when some rank's loss is non-finite); returns (the step's mean loss, its non-finite flag), both on
    the device. ``record``: keep the indicators of the last micro-batch (a logging step)."""
    engine, accum = tr.engine, tr.cfg.train.grad_accum_steps
    losses = []
    for micro in range(accum):
        engine.module.record_indicators(record and micro == accum - 1)
        x, y = (to_device(b, tr.device) for b in tr.train_sampler.batch(step, micro * tr.world + tr.rank))
        loss = engine(x, y, **tr.packed(x))
        engine.backward(loss)
        losses.append(loss.detach().float())
        if micro == accum - 1:
            step_loss = torch.stack(losses).mean()
            bad = _nonfinite_anywhere(step_loss)
            tr.client_opt.skip_step = bad  # read by the update on the device, on every rank alike
            tr.hooks.before_step(bad)  # AdaLoRA: importance from this step's full gradients
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
    tr.client_opt.skip_step = False
    tr.hooks.after_step(step + 1)  # AdaLoRA: rank allocation
    return step_loss, bad


# ----------------------------------------------------------------------------------------------
# The loop


class _Progress:
    """Rank 0's progress (``train.progress``): a bar on a terminal, log lines in a file; or nothing."""

    def __init__(self, tr: Trainer, end: int):
        self.bar = None
        if tr.rank == 0 and tr.cfg.train.progress:
            self.bar = progress_bar(end, initial=tr.start, desc="train", unit="step")
            if tr.resumed_from is not None:
                self.bar.write(f"resumed from {tr.resumed_from} at step {tr.start}")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def postfix(self, loss: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Window:
    """Training throughput: counts training time only (not eval or checkpoint writes), measured
    between the host syncs of logging steps so that the device's queue is drained at both ends."""

    def __init__(self):
        self.t0, self.steps, self.paused_s, self.total_s, self.total_steps = (
            time.perf_counter(),
            0,
            0.0,
            0.0,
            0,
        )

    def close(self, tokens_per_step: int) -> float:
        """Tokens/s over the window since the last close, which starts a new one."""
        elapsed = time.perf_counter() - self.t0 - self.paused_s
        self.total_s, self.total_steps = self.total_s + elapsed, self.total_steps + self.steps
        tok_s = tokens_per_step * self.steps / max(elapsed, 1e-9)
        self.t0, self.steps, self.paused_s = time.perf_counter(), 0, 0.0
        return tok_s


def _log_record(tr: Trainer, step: int, step_loss: torch.Tensor, lrs: dict, tok_s: float) -> dict:
    """A logging step's values: loss, throughput, every group's lr, grad norm and clip coefficient,
    the stability indicators, the features' metrics and the tokens drawn from each source."""
    values = {"loss": _mean_over_ranks(step_loss.item()), "tokens_per_s": tok_s}
    values.update(throughput_metrics(tok_s, flops_per_token(tr.cfg.model, tr.cfg.train.seq_len), tr.device))
    values.update({f"lr/{k}": v for k, v in lrs.items()})
    values.update({f"grad_norm/{k}": v for k, v in tr.client_opt.last_grad_norms.items()})
    values.update({f"clip_coef/{k}": v for k, v in tr.client_opt.last_clip_coefs.items()})
    values.update(tr.engine.module.stability_stats())
    values.update(tr.hooks.metrics())  # AdaLoRA ranks, AdaMoLE expert use
    values.update({f"tokens/{n}": c for n, c in zip(tr.source_names, tr.train_sampler.tokens_seen(step))})
    return values


def _skipped_since_last_sync(tr: Trainer, skips: SkippedSteps, metrics, step: int) -> bool:
    """Log the updates skipped since the last sync; stop the run after too many in a row. True when
    this step's own update was skipped."""
    skipped, stop_at = skips.read()
    for s, count in skipped:
        metrics.log(s, {"nonfinite_loss": 1.0, "skipped_steps": count}, kind="event")
    if stop_at is not None:
        good_tag = rundir.latest_tag(tr.ckpt_dir)
        good = f"last good checkpoint: {tr.ckpt_dir / good_tag}" if good_tag else "no checkpoint was saved"
        raise TrainingError(
            f"stopping: {skips.limit} non-finite losses in a row at step {stop_at} "
            f"(updates skipped; {good}); lower optim.lr or check the data"
        )
    return bool(skipped) and skipped[-1][0] == step


def _finished_already(tr: Trainer, result: TrainResult) -> TrainResult:
    """Nothing left to do: report what the finished run measured."""
    result.train_losses = {r["step"]: r["loss"] for r in rundir.read_metrics(tr.run_dir, "train")}
    result.val_losses = {r["step"]: r["val_loss"] for r in rundir.read_metrics(tr.run_dir, "eval")}
    if tr.rank == 0:
        what = "train.stop_at" if tr.cfg.train.stop_at else "train.steps"
        print(f"run already complete at step {tr.start} (raise {what} to train on)", file=sys.stderr)
    return result


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training the config describes; return what it measured."""
    t = cfg.train
    tr = setup(cfg)
    end = t.stop_at or t.steps  # the schedule spans train.steps; this run stops at `end`
    result = TrainResult(run_dir=tr.run_dir, steps=tr.start)
    if tr.start >= end:
        return _finished_already(tr, result)
    metrics = rundir.MetricsWriter(tr.run_dir, enabled=tr.rank == 0)
    progress, window = _Progress(tr, end), _Window()
    skips, last_saved = SkippedSteps(t.max_nonfinite_in_row), tr.start
    for step in range(tr.start + 1, end + 1):  # `step` counts the updates done after this one
        lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}  # the lrs this update uses
        last = step == end
        logs = step % t.log_every == 0 or last
        evals = (t.eval_every and step % t.eval_every == 0) or last
        saves = (t.save_every and step % t.save_every == 0) or (last and t.save_final)
        step_loss, bad = train_step(tr, step - 1, record=logs)
        skips.add(step, bad)
        result.steps, window.steps = step, window.steps + 1
        progress.update()
        if not (logs or evals or saves):
            continue  # no host sync on this step
        # A step that syncs anyway: learn which updates were skipped since the last one.
        this_skipped = _skipped_since_last_sync(tr, skips, metrics, step)
        result.skipped_steps = skips.total
        if this_skipped:
            if not last:
                continue  # this step's update was skipped: nothing to log, evaluate or save
            # The last step (train.steps or stop_at) still ends with its eval and checkpoint: the state
            # is the previous step's, and a PBT segment or a resumed run needs it at this step.
            logs = False
        if logs:
            tok_s = window.close(t.tokens_per_step(tr.world))
            record = metrics.log(step, _log_record(tr, step, step_loss, lrs, tok_s))
            result.train_losses[step] = record["loss"]
            progress.postfix(record["loss"], tok_s)
        pause_t0 = time.perf_counter()
        if evals:
            result.val_losses[step] = val = evaluate(tr, t.eval_batches)
            metrics.log(step, {"val_loss": val}, kind="eval")
            progress.write(f"step {step}: val loss {val:.4f}")
        if saves:
            save_checkpoint(tr.engine, tr.ckpt_dir, step, tr.rank, {"config": cfg.to_dict()})
            last_saved = step
        window.paused_s += time.perf_counter() - pause_t0
    progress.close()
    metrics.close()
    result.tokens_per_s = t.tokens_per_step(tr.world) * window.total_steps / max(window.total_s, 1e-9)
    if tr.rank == 0:
        rundir.write_summary(tr.run_dir, _summary(result, last_saved))
    return result


def _summary(result: TrainResult, last_saved: int) -> dict:
    return {
        "steps": result.steps,
        "last_checkpoint_step": last_saved,
        "skipped_steps": result.skipped_steps,
        "final_train_loss": result.train_losses.get(result.steps),
        "final_val_loss": result.val_losses.get(result.steps),
        "tokens_per_s": result.tokens_per_s,
        "rules_version": RULES_VERSION,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``train`` has no flags of its own: everything is in the config and its overrides."""


def run(args: argparse.Namespace) -> int:
    """The ``train`` verb: train, then (on rank 0) one line on where the run is and how it ended."""
    result = train(load_config(args.config, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        val = result.val_losses.get(result.steps)
        loss = result.train_losses.get(result.steps)
        print(
            f"run directory: {result.run_dir}  (steps {result.steps}, final train loss "
            f"{loss if loss is None else f'{loss:.4f}'}, val loss {val if val is None else f'{val:.4f}'}, "
            f"{result.tokens_per_s:,.0f} tokens/s)"
        )
    return 0


if __name__ == "__main__":  # what the deepspeed launcher runs (it appends --local_rank=N)
    from mupfast.cli import program

    program(["train", *sys.argv[1:]])
