"""``train.compile``: torch.compile of each transformer block (regional compilation).

Each block is compiled on its own, as torchtitan does: the blocks share one compiled graph (they
differ only in their parameters), so compile time does not grow with depth, and inside a block the
norms, RoPE, SwiGLU and residual adds fuse around the matmuls and attention. The embedding and the
readout stay eager: the readout is already one fused kernel (or a chunked loss), and its μP logit
multiplier, like the embedding scale, can then change at run time without a recompilation. A block's
attention scale and branch multipliers are Python floats the graph guards on: changing one
recompiles the blocks once.

Activation checkpointing is applied first (:mod:`mupfast.distributed.activation_checkpoint`): the compiled
region then contains the checkpoint, which torch.compile traces as one higher-order op.
"""

from __future__ import annotations

import torch._dynamo
from torch import nn


def compile_blocks(model: nn.Module, **options) -> None:
    """Compile every block of ``model.blocks`` in place (``nn.Module.compile``: parameter names and
    state-dict keys do not change). ``options`` go to ``torch.compile`` (backend, mode, …)."""
    # A block records its indicators (branch RMS, attention Z's q and k) as a side effect. Under a
    # checkpoint, eager replays it in the recomputation; compiled, it would break the graph. The
    # recomputed values are the same, so the compiled block records them once, in the forward.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.blocks:
        block.compile(**options)
