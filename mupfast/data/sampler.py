"""The batch sampler: ``(inputs, targets)`` windows of a token shard, a pure function of the step.

:class:`BatchSampler` draws windows at offsets keyed by ``(seed, step, micro_step, rank)``: stateless,
so a resumed run needs only the step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from mupfast.data.shards import TokenShard
from mupfast.errors import DataError

if TYPE_CHECKING:
    import torch

_TRAIN_STREAM, _EVAL_STREAM = 0x7472, 0x6576  # keep the train and eval keys disjoint
EVAL_SEED = 0


class BatchSampler:
    """Random windows of a shard, stateless: the batch is a pure function of (seed, step, micro_step, rank).

    ``batch(step, micro_step)`` returns int64 ``(inputs, targets)`` of shape (micro_batch_size, seq_len),
    each row a contiguous window of seq_len+1 tokens at a uniform random offset (with replacement),
    targets = inputs shifted by one. Resume needs only the step; ranks draw different data.
    ``eval_batches(n)`` yields the same n batches every call, keyed by ``eval_seed`` and the index
    (not by the training seed, so runs with different seeds evaluate on the same windows); rank r
    takes the global eval batches r, r + world_size, …, so all ranks together cover the first
    n·world_size of them.
    """

    def __init__(
        self,
        shard: TokenShard,
        *,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        eval_seed: int = EVAL_SEED,
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(
                f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be positive"
            )
        if seed < 0 or eval_seed < 0:
            raise ValueError(f"seeds must be non-negative (got seed={seed}, eval_seed={eval_seed})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if len(shard) < seq_len + 1:
            raise DataError(f"{shard.path}: {len(shard)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.shard, self.seq_len, self.micro_batch_size = shard, seq_len, micro_batch_size
        self.seed, self.rank, self.world_size, self.eval_seed = seed, rank, world_size, eval_seed

    def _draw(self, key: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        rng = np.random.default_rng(key)
        starts = rng.integers(0, len(self.shard) - self.seq_len, size=self.micro_batch_size)
        windows = self.shard.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0 or micro_step < 0:
            raise ValueError(f"step ({step}) and micro_step ({micro_step}) must be non-negative")
        return self._draw([_TRAIN_STREAM, self.seed, step, micro_step, self.rank])

    def eval_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(n):
            yield self._draw([_EVAL_STREAM, self.eval_seed, k * self.world_size + self.rank, 0, 0])
