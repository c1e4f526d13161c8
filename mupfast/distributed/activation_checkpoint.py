"""Activation checkpointing of transformer blocks: ``train.activation_checkpointing``.

A checkpointed block keeps only its input through the forward and runs again in the backward to
rebuild what its gradients need. The modes:

- ``none``: every activation is kept (the fastest step, the most memory);
- ``full``: every block is checkpointed;
- ``every_k``: blocks 0, k, 2k, … (k = ``train.checkpoint_every``), a point between the two;
- ``selective``: every block, but the outputs of matrix multiplies and attention are kept and only
  the cheap ops around them (norms, RoPE, activations, residual adds) are recomputed, as
  torchtitan's op-level selective mode.

We use PyTorch's non-reentrant ``torch.utils.checkpoint`` for every backend and ZeRO stage, not
DeepSpeed's ``deepspeed.checkpointing``: the non-reentrant form re-enters the module through its
forward hooks, so ZeRO-3 gathers the block's partitioned parameters for the recomputation as it does
for the forward; it needs no ``requires_grad`` input (the embedding output of a frozen model has
none); it supports keyword arguments (document ids, positions); and it composes with
``torch.compile``. DeepSpeed's own is the reentrant kind and adds partitioned or CPU-offloaded
activations, which mupfast does not use. The RNG state is saved and restored, so a recomputed block
draws the same numbers; nothing in a block draws any today.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "every_k", "selective")

# What the selective mode keeps: the matmuls and attention (the costly ops). Everything else in a
# block is recomputed in the backward.
_KEEP = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(num_layers: int, mode: str, every: int = 2) -> list[int]:
    """Indices of the blocks the mode checkpoints."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "none":
        return []
    if mode == "every_k":
        if every < 1:
            raise ValueError(f"checkpoint_every must be ≥ 1 (got {every})")
        return list(range(0, num_layers, every))
    return list(range(num_layers))


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Checkpoint the blocks of ``model.blocks`` that ``mode`` names; return their indices.

    Each chosen block's ``forward`` is replaced on the instance, so the module tree, parameter names
    and state-dict keys stay as they were (checkpoints and export see no difference). Applied once,
    before ``torch.compile`` and before DeepSpeed wraps the model.
    """
    chosen = checkpointed_blocks(len(model.blocks), mode, every)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    for i in chosen:
        _checkpoint_forward(model.blocks[i], context_fn if mode == "selective" else None)
    return chosen


def _checkpoint_forward(block: nn.Module, context_fn) -> None:
    plain = type(block).forward.__get__(block)  # the class's forward, bound to this block
    extra = {"context_fn": context_fn} if context_fn is not None else {}

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (block.training and torch.is_grad_enabled()):
            return plain(x, *args, **kwargs)  # eval and decoding: nothing is saved anyway
        # The block's submodules run through their __call__ in the recomputation too, so ZeRO-3's
        # hooks gather their parameters again.
        return checkpoint(plain, x, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = forward
