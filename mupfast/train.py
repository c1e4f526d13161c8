"""The training loop: ``mupfast train``, and ``python -m mupfast.train`` under the deepspeed launcher.

Read top to bottom: set up ranks and data, build the μP model, optimizer and schedule, hand them to
DeepSpeed, resume if a checkpoint exists, then train with periodic eval, metrics and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mupfast.activation_checkpoint import apply_activation_checkpointing
from mupfast.config import Config, load_config
from mupfast.data import BatchSampler, prepare_sources
from mupfast.data.packing import document_ids, position_ids
from mupfast.engine import (
    checkpoint_dir,
    ds_config,
    init_distributed,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
)
from mupfast.errors import ConfigError, TrainingError
from mupfast.finetune.attach import prepare_finetune
from mupfast.flops import flops_per_token, throughput_metrics
from mupfast.metrics import MetricsWriter, read_metrics
from mupfast.model import build_model
from mupfast.optim import build_optimizer
from mupfast.optim.optimizer import apply_hyperparameters
from mupfast.optim.zero_shards import attach as attach_to_zero
from mupfast.parametrization import RULES_VERSION
from mupfast.regional_compile import compile_blocks


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


def packing(cfg: Config, eos_id: int | None) -> Callable[[torch.Tensor], dict]:
    """What a batch's input ids tell the model besides themselves: the document of every token
    (data.document_masking) and its position in it (data.reset_position_ids), read off the EOS that
    ends each document."""
    d = cfg.data
    if not (d.document_masking or d.reset_position_ids):
        return lambda x: {}
    if eos_id is None:
        raise ConfigError(
            "data.document_masking: the prepared data has no end-of-document token (prepared by an older "
            "mupfast); prepare it again"
        )

    def model_kwargs(x: torch.Tensor) -> dict:
        docs = document_ids(x, eos_id)
        out = {"doc_ids": docs} if d.document_masking else {}
        if d.reset_position_ids:
            out["position_ids"] = position_ids(docs)
        return out

    return model_kwargs


@torch.no_grad()
def evaluate(engine, sampler: BatchSampler, n_batches: int, device: torch.device, packed) -> float:
    engine.eval()
    losses = []
    for x, y in sampler.eval_batches(n_batches):
        x, y = to_device(x, device), to_device(y, device)
        losses.append(engine(x, y, **packed(x)).float().item())
    engine.train()
    return sum(losses) / len(losses)


def _source_names(data) -> list[str]:
    """A metrics name per mixture source: its corpus's file stem, made unique."""
    names: list[str] = []
    for i, s in enumerate(data.sources):
        corpus = s.prepared or (s.corpus if isinstance(s.corpus, str) else s.corpus[0])
        stem = Path(corpus.rstrip("/")).name.split("*")[0].split(".")[0] or f"source{i}"
        names.append(stem if stem not in names else f"{stem}{i}")
    return names


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training the config describes; return what it measured."""
    import deepspeed

    t = cfg.train
    rank, local_rank, world = init_distributed(t.dist_timeout_s)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(t.run_dir)
    ckpt_dir = checkpoint_dir(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # Data: rank 0 prepares (cached by fingerprint), the others wait and then open the same shards.
    if rank == 0:
        sources = prepare_sources(cfg.data, progress=t.progress)
    if world > 1:
        dist.barrier()
    if rank != 0:
        sources = prepare_sources(cfg.data, progress=False)
    tokenizer = sources[0].tokenizer()
    if rank == 0:  # the run carries its own tokenizer: export and generate read it from here
        tokenizer.save(run_dir)
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
    source_names = _source_names(cfg.data) if len(sources) > 1 else []
    packed = packing(cfg, tokenizer.eos_id)

    # Model, optimizer and schedule: every lr is optim.lr · schedule(t) · lr_mult of its group.
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    tuner = prepare_finetune(model, cfg)  # finetune.*: the base run's weights, frozen, adapters attached
    train_sampler, val_sampler = tuner.samplers(train_sampler, val_sampler)  # prompt/completion: loss masks
    apply_activation_checkpointing(model, t.activation_checkpointing, t.checkpoint_every)
    if t.compile:
        compile_blocks(model)
    # every group's lr is base · schedule(t) · lr_mult, set by the optimizer's GroupLR (hyperp's base
    # η counts every rank's tokens in its batch)
    optimizer = build_optimizer(model, cfg, world_size=world, reduce_norms=cfg.zero.stage >= 1)
    scheduler = optimizer.lr_schedule
    if cfg.zero.stage == 3 and cfg.model.tie_embeddings:
        deepspeed.zero.register_external_parameter(model.readout, model.tok_emb.weight)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, world)
    )
    client_opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    attach_to_zero(engine, client_opt)  # ZeRO: one collective for all groups' norms; Muon's matrix layout

    start, end = 0, t.stop_at or t.steps  # the schedule spans train.steps; this run stops at `end`
    tag = latest_tag(ckpt_dir) if t.resume else None
    if tag is not None:
        start = int(load_checkpoint(engine, ckpt_dir, tag, rank)["step"])
        # The config's hyperparameters, not the checkpoint's: the saved groups' betas, eps, weight decay
        # and clip thresholds are replaced, and the lrs recomputed from lr_mult (a PBT member resumes
        # with the values explore gave it).
        apply_hyperparameters(client_opt, client_opt.configured)
        scheduler.load_state_dict({"last_step": start})

    result = TrainResult(run_dir=run_dir, steps=start)
    if start >= end:  # nothing left to do: report what the finished run measured
        result.train_losses = {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}
        result.val_losses = {r["step"]: r["val_loss"] for r in read_metrics(run_dir, "eval")}
        if rank == 0:
            what = "train.stop_at" if t.stop_at else "train.steps"
            print(f"run already complete at step {start} (raise {what} to train on)", file=sys.stderr)
        return result
    metrics = MetricsWriter(run_dir, enabled=rank == 0)
    tokens_per_step = t.tokens_per_step(world)
    bar = None
    if rank == 0 and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        if start:
            bar.write(f"resumed from {ckpt_dir / tag} at step {start}")

    skips, last_saved = SkippedSteps(t.max_nonfinite_in_row), start
    flops_token = flops_per_token(cfg.model, t.seq_len)
    # Throughput counts training time only (not eval or checkpoint writes), measured between the
    # host syncs of logging steps so that the device's queue is drained at both ends.
    window_t0, window_steps, paused_s, total_s, total_steps = time.perf_counter(), 0, 0.0, 0.0, 0
    for step in range(start, end):
        # Forward/backward over the micro-batches; DeepSpeed steps the optimizer at the boundary.
        step_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the lrs this update uses
        losses = []
        last = step + 1 == end
        logs = (step + 1) % t.log_every == 0 or last
        evals = (t.eval_every and (step + 1) % t.eval_every == 0) or last
        saves = (t.save_every and (step + 1) % t.save_every == 0) or (last and t.save_final)
        for micro in range(t.grad_accum_steps):
            # Indicators only where they are logged: the last micro-batch of a logging step.
            engine.module.record_indicators(logs and micro == t.grad_accum_steps - 1)
            x, y = (to_device(b, device) for b in train_sampler.batch(step, micro * world + rank))
            loss = engine(x, y, **packed(x))
            engine.backward(loss)
            losses.append(loss.detach().float())
            if micro == t.grad_accum_steps - 1:
                step_loss = torch.stack(losses).mean()
                bad = _nonfinite_anywhere(step_loss)
                client_opt.skip_step = bad  # read by the update on the device, on every rank alike
                tuner.before_step(bad)  # AdaLoRA: importance from this step's full gradients
            engine.step()
        client_opt.skip_step = False
        tuner.after_step(step + 1)  # AdaLoRA: rank allocation
        skips.add(step + 1, bad)
        result.steps = step + 1
        window_steps += 1
        if bar is not None:
            bar.update(1)
        if not (logs or evals or saves):
            continue  # no host sync on this step

        # A step that syncs anyway: learn which updates were skipped since the last one.
        skipped, stop_at = skips.read()
        for s, count in skipped:
            metrics.log(s, {"nonfinite_loss": 1.0, "skipped_steps": count}, kind="event")
        result.skipped_steps = skips.total
        if stop_at is not None:
            good_tag = latest_tag(ckpt_dir)
            good = f"last good checkpoint: {ckpt_dir / good_tag}" if good_tag else "no checkpoint was saved"
            raise TrainingError(
                f"stopping: {skips.limit} non-finite losses in a row at step {stop_at} "
                f"(updates skipped; {good}); lower optim.lr or check the data"
            )
        if skipped and skipped[-1][0] == step + 1:
            if not last:
                continue  # this step's update was skipped: nothing to log, evaluate or save
            # The last step (train.steps or stop_at) still ends with its eval and checkpoint: the state
            # is the previous step's, and a PBT segment or a resumed run needs it at this step.
            logs = False

        if logs:
            elapsed = time.perf_counter() - window_t0 - paused_s
            total_s, total_steps = total_s + elapsed, total_steps + window_steps
            tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
            values = {"loss": _mean_over_ranks(step_loss.item()), "tokens_per_s": tok_s}
            values.update(throughput_metrics(tok_s, flops_token, device))
            values.update({f"lr/{k}": v for k, v in step_lrs.items()})
            values.update({f"grad_norm/{k}": v for k, v in client_opt.last_grad_norms.items()})
            values.update({f"clip_coef/{k}": v for k, v in client_opt.last_clip_coefs.items()})
            values.update(engine.module.stability_stats())
            values.update(tuner.metrics())  # AdaLoRA ranks, AdaMoLE expert use
            values.update(
                {f"tokens/{n}": c for n, c in zip(source_names, train_sampler.tokens_seen(step + 1))}
            )
            record = metrics.log(step + 1, values)
            result.train_losses[step + 1] = record["loss"]
            window_t0, window_steps, paused_s = time.perf_counter(), 0, 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}")

        pause_t0 = time.perf_counter()
        if evals:
            val = evaluate(engine, val_sampler, t.eval_batches, device, packed)
            metrics.log(step + 1, {"val_loss": val}, kind="eval")
            result.val_losses[step + 1] = val
            if bar is not None:
                bar.write(f"step {step + 1}: val loss {val:.4f}")
        if saves:
            save_checkpoint(engine, ckpt_dir, step + 1, rank, {"config": cfg.to_dict()})
            last_saved = step + 1
        paused_s += time.perf_counter() - pause_t0

    if bar is not None:
        bar.close()
    metrics.close()
    result.tokens_per_s = tokens_per_step * total_steps / max(total_s, 1e-9)
    if rank == 0:
        summary = {
            "steps": result.steps,
            "last_checkpoint_step": last_saved,
            "skipped_steps": result.skipped_steps,
            "final_train_loss": result.train_losses.get(result.steps),
            "final_val_loss": result.val_losses.get(result.steps),
            "tokens_per_s": result.tokens_per_s,
            "rules_version": RULES_VERSION,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


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
    from mupfast.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
