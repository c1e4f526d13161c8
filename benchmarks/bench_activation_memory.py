"""Activation memory of a training forward: bytes kept for the backward, per token and per block, with
activation checkpointing none / full / every_2 / selective (``train.activation_checkpointing``).

    python -m benchmarks.bench_activation_memory                  # 125M and 1.3B shapes, bf16, CPU, < 1 min
    python -m benchmarks.bench_activation_memory --smoke --out /tmp/x   # the tiny model

Device-independent: it counts tensors, not allocator statistics, so it runs on the CPU (real tensors:
storages are told apart by their address; the meta device would route SDPA to its math path, which
keeps the T×T scores, where CPU SDPA is a flash kernel keeping q, k, v, out and the log-sum-exp as
the GPU kernels do). Two counts, each deduplicated by storage (a tensor that several ops save, or
views of one buffer, are one allocation and counted once, at the storage's size):

- ``saved``: every tensor autograd packs for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  attributed to the block whose forward packed it; parameters and buffers are not activations and
  are left out. A checkpointed block packs only its inputs (non-reentrant checkpoint saves them
  through an autograd function, visible to the hook).
- ``held``: every storage the forward created that is still alive when it returns (weak references
  taken in a dispatch mode), attributed as ``saved`` where autograd saved it, else to the block
  that created it. It equals ``saved`` where both see the same tensors, and it also sees what
  autograd's hooks cannot: the selective mode keeps its matmul and attention outputs in the
  checkpoint's own cache, not in saved tensors, so for ``selective`` only ``held`` is right. The
  reductions and the GiB column use ``held``.

Per-token bytes of a block do not depend on the depth or (with flash-style attention) on the
sequence length, so the shapes are measured at ``--layers`` blocks (even: every_2 alternates) and a
short sequence, batch 1; ``blocks_GiB_at_config`` scales the per-block figure to the config's depth
and micro-batch × seq_len. The indicator tensors the trainer computes on logging steps only are off.
"""

from __future__ import annotations

import argparse
import copy
import gc
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import publish
from mupfast.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# name in the results -> (train.activation_checkpointing, train.checkpoint_every)
MODES = {"none": ("none", 2), "full": ("full", 2), "every_2": ("every_k", 2), "selective": ("selective", 2)}
TARGET_FULL_REDUCTION = 5.0  # issue 18: full checkpointing keeps at least 5× less than none


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Created(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns, with the label current then."""

    def __init__(self, counter: ActivationCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                s = t.untyped_storage()
                seen = self.counter.created.get(s.data_ptr())
                # A storage freed during the forward leaves its address to the next allocation: the
                # entry is replaced unless it still names this very storage (views, in-place ops).
                if s.nbytes() and (seen is None or seen[0]() is not s):
                    self.counter.created[s.data_ptr()] = (weakref.ref(s), s.nbytes(), self.counter.label)
        return out


class ActivationCounter:
    """Counts, per label (block index or "outside"), what a forward keeps for the backward."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.label: int | str = "outside"
        self.exclude = {_key(t) for t in (*model.parameters(), *model.buffers())}
        self.saved: dict[int, tuple[int, int | str]] = {}  # storage -> (bytes, label of first saver)
        self.created: dict[int, tuple[weakref.ref, int, int | str]] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        nbytes = t.untyped_storage().nbytes()
        if nbytes and key not in self.exclude and key not in self.saved:
            self.saved[key] = (nbytes, self.label)
        return t

    def forward(self, *args) -> torch.Tensor:
        """Run model(*args) counting; returns its output (keep it: it holds the graph)."""
        hooks = []
        for i, block in enumerate(self.model.blocks):  # after checkpointing was applied: the hooks
            # then fire around the checkpointed forward, so its saved inputs count towards block i
            hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "label", i)))
            hooks.append(block.register_forward_hook(lambda m, a, o: setattr(self, "label", "outside")))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t), _Created(self):
                out = self.model(*args)
        finally:
            for h in hooks:
                h.remove()
        return out

    def held(self, keep: torch.Tensor) -> dict[int, tuple[int, int | str]]:
        """The created storages alive now (besides ``keep``'s, parameters' and buffers')."""
        gc.collect()
        skip = self.exclude | {_key(keep)}
        # Attributed like ``saved`` where autograd saved it (the block input a checkpoint keeps was
        # made by the block before), else to the block that made it (the selective mode's cache).
        return {
            k: (n, self.saved[k][1] if k in self.saved else label)
            for k, (ref, n, label) in self.created.items()
            if ref() is not None and k not in skip
        }


def _by_label(entries: dict[int, tuple[int, int | str]], layers: int) -> tuple[list[int], int]:
    blocks, outside = [0] * layers, 0
    for nbytes, label in entries.values():
        if label == "outside":
            outside += nbytes
        else:
            blocks[label] += nbytes
    return blocks, outside


def measure_mode(base: torch.nn.Module, mode: str, every: int, tokens: torch.Tensor) -> dict:
    """One forward of the loss through a copy of ``base`` with the mode's checkpointing; what it
    keeps, per token."""
    from mupfast.distributed.activation_checkpoint import apply_activation_checkpointing

    model = copy.deepcopy(base)
    chosen = apply_activation_checkpointing(model, mode, every)
    counter = ActivationCounter(model)
    loss = counter.forward(tokens[:, :-1], tokens[:, 1:])
    n_tok, layers = tokens[:, :-1].numel(), len(model.blocks)
    saved_blocks, saved_out = _by_label(counter.saved, layers)
    held_blocks, held_out = _by_label(counter.held(loss), layers)
    del loss, counter, model
    gc.collect()
    return {
        "blocks_checkpointed": len(chosen) if chosen is not None else None,
        "saved_B_per_token_per_block": sum(saved_blocks) / layers / n_tok,
        "held_B_per_token_per_block": sum(held_blocks) / layers / n_tok,
        "saved_B_per_token_outside": saved_out / n_tok,
        "held_B_per_token_outside": held_out / n_tok,
        "_held_per_block": [b / n_tok for b in held_blocks],
    }


def build(cfg, dtype: torch.dtype) -> torch.nn.Module:
    """The model in training mode, indicators off (as on the trainer's steps that log nothing).
    The μP init is skipped: it changes values, not what is kept."""
    from mupfast.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dtype)
    model.train()
    if hasattr(model, "record_indicators"):
        model.record_indicators(False)
    return model


def run_model(name: str, config: Path, args, dtype: torch.dtype) -> list[dict]:
    overrides = [f"model.num_layers={args.layers}"] if args.layers else []
    cfg = load_config(config, overrides)
    full = load_config(config)  # the config's own depth and batch, for the scaled column
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    model = build(cfg, dtype)
    rows, base = [], None
    for label in args.modes:
        mode, every = MODES[label]
        r = measure_mode(model, mode, every, tokens)
        per_block = r.pop("_held_per_block")
        base = base or (r if label == "none" else None)
        row = {"model": name, "mode": label, "layers_measured": cfg.model.num_layers}
        row |= {"tokens": tokens[:, :-1].numel(), "dtype": str(dtype).removeprefix("torch."), **r}
        kept = r["held_B_per_token_per_block"]  # = saved, but for selective's cache (module docstring)
        row["reduction_vs_none"] = base["held_B_per_token_per_block"] / kept if base and kept else None
        t = full.train
        row["blocks_GiB_at_config"] = kept * full.model.num_layers * t.micro_batch_size * t.seq_len / 2**30
        row["held_B_per_token_by_block"] = " ".join(f"{b:.0f}" for b in per_block)
        rows.append(row)
        print(
            f"{name:6s} {label:9s} saved {row['saved_B_per_token_per_block']:10.0f} B/token/block "
            f"held {row['held_B_per_token_per_block']:10.0f}  {row['reduction_vs_none'] or 0:5.1f}x less than none",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="125m,1.3b", help="config names under configs/")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--layers", type=int, default=2, help="blocks built (even; 0: the config's depth)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--smoke", action="store_true", help="the tiny model, a short sequence, fp32")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if "none" in args.modes:  # the baseline first, so every row can carry its reduction
        args.modes = ["none", *(m for m in args.modes if m != "none")]
    if args.smoke:
        models, args.seq_len, args.dtype = ["tiny"], 64, "fp32"
    else:
        models = args.models.split(",")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_grad_enabled(True)
    rows = []
    with torch.device("cpu"):
        for name in models:
            rows += run_model(name, ROOT / "configs" / f"{name}.yaml", args, dtype)
    full = [r for r in rows if r["mode"] == "full" and r["reduction_vs_none"]]
    verdict = "; ".join(
        f"{r['model']}: full keeps {r['reduction_vs_none']:.1f}x less than none "
        f"({'meets' if r['reduction_vs_none'] >= TARGET_FULL_REDUCTION else 'MISSES'} the "
        f"{TARGET_FULL_REDUCTION:g}x target)"
        for r in full
    )
    notes = (
        f"bytes kept for the backward by one training forward (loss included), {args.dtype}, batch "
        f"{args.batch} x seq {args.seq_len}, torch backends on the CPU (SDPA flash, chunked readout); "
        "saved = tensors packed by autograd (saved_tensors_hooks), held = storages the forward created "
        "still alive after it (sees selective's cache); both deduplicated by storage, parameters and "
        "buffers excluded; per block = mean over the blocks; outside = embedding, final norm, readout; "
        "reduction_vs_none and blocks_GiB_at_config (the config's depth x micro-batch x seq_len) use held"
        + (f"; {verdict}" if verdict else "")
    )
    return publish("activation_memory", rows, notes, args, smoke="the tiny model: figures not the targets'")


if __name__ == "__main__":
    main()
