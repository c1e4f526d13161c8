"""Optimization: the μP parameter groups and the one optimizer that steps them.

* :mod:`~mupfast.optim.groups`: groups from the rules table (lr/wd multipliers, clip norm) and the
  base lr they scale.
* :mod:`~mupfast.optim.optimizer`: :class:`ClipAdamW`, per-group clipping fused into each group's
  update, and :func:`build_optimizer`, which attaches the :class:`~mupfast.optim.schedules.GroupLR`
  that sets its lrs.
* :mod:`~mupfast.optim.updates`: the update kinds a group can take (AdamW, MuonH, AdamH), one signature.
* hyperp's matrices: :mod:`~mupfast.optim.muon` (MuonH), :mod:`~mupfast.optim.sphere` (the sphere
  step MuonH and AdamH share), :mod:`~mupfast.optim.muon_sharded` (MuonH on ZeRO partitions).
* :mod:`~mupfast.distributed.zero_shards`: what DeepSpeed's ZeRO optimizers hand ours (one norm
  collective per step; where each matrix's slices sit in a flat partition).
"""

from mupfast.optim.groups import base_lr, build_param_groups
from mupfast.optim.optimizer import ClipAdamW, build_optimizer

__all__ = ["ClipAdamW", "base_lr", "build_optimizer", "build_param_groups"]
