"""The batch sampler: ``(inputs, targets)`` windows of token shards, a pure function of the step.

:class:`ShardSet` reads the shards of one split of one source as one set of windows (a window never
crosses a shard). :class:`BatchSampler` numbers the training rows globally, assigns them to the
sources of a mixture in exact proportion (a fixed period of slots) and gives each source's local
row a window, at random or in a shuffled epoch order (:func:`feistel_permute`). Nothing is stateful:
a batch is a pure function of ``(seed, step, micro)``, so a resumed run needs only the step and any
split of a step into ranks × accumulation sees the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mupfast.data.shards import TokenShard
from mupfast.errors import DataError

if TYPE_CHECKING:
    import torch

_TRAIN_STREAM, _EVAL_STREAM = 0x7472, 0x6576  # keep the train and eval keys disjoint
EVAL_SEED = 0
MAX_PERIOD = 4096  # at most this many slots in one period of the source schedule
_BLOCK = 64  # random mode: one generator per block of 64 consecutive local rows of a source
_FEISTEL_ROUNDS = 6
_M64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 over uint64 values (wrapping arithmetic: silence numpy's scalar overflow warning)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int | np.ndarray) -> np.ndarray:
    """A uint64 key hashed from non-negative ints (or int arrays, broadcast), each taken mod 2**64."""
    h = np.zeros((), dtype=np.uint64)
    for p in parts:
        p = np.asarray(p) if isinstance(p, np.ndarray) else np.uint64(p & _M64)
        h = _mix(h ^ p.astype(np.uint64))
    return h


def _feistel(x: np.ndarray, key: np.ndarray, bits: int) -> np.ndarray:
    """A keyed bijection of [0, 2**bits): an alternating (unbalanced) Feistel network."""
    low = bits // 2  # width of the right half; the halves swap widths every round
    for r in range(_FEISTEL_ROUNDS):
        high = bits - low
        right, left = x & np.uint64((1 << low) - 1), x >> np.uint64(low)
        f = _mix(right ^ _mix(key ^ np.uint64(r + 1))) & np.uint64((1 << high) - 1)
        x = (right << np.uint64(high)) | (left ^ f)
        low = high
    return x


def feistel_permute(index: np.ndarray, size: int, key: int | np.ndarray) -> np.ndarray:
    """perm_key(index): a pseudo-random permutation of range(size), never materialised.

    A keyed Feistel network on the next power of two ≥ size, with cycle walking (re-apply until the
    value falls inside range(size); fewer than two rounds of walking on average). ``key`` is an int
    or a uint64 array broadcastable to ``index``; returns int64.
    """
    index = np.asarray(index, dtype=np.int64)
    if size < 1 or (index.size and (index.min() < 0 or index.max() >= size)):
        raise ValueError(f"indices must lie in range({size})")
    if size == 1:
        return np.zeros_like(index)
    bits = (size - 1).bit_length()
    key = np.broadcast_to(key if isinstance(key, np.ndarray) else np.uint64(key & _M64), index.shape)
    key = key.astype(np.uint64)
    y = _feistel(index.astype(np.uint64), key, bits)
    while (out := y >= np.uint64(size)).any():
        y[out] = _feistel(y[out], key[out], bits)
    return y.astype(np.int64)


class ShardSet:
    """One split of one source: several shards read as one set of windows (a window never crosses a shard).

    A shard of n tokens has max(0, n − seq_len) valid random starts and (n − 1) // seq_len epoch windows
    [k·seq_len, k·seq_len + seq_len + 1); the set numbers them shard after shard.
    """

    def __init__(self, shards: Sequence[TokenShard]):
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("a ShardSet needs at least one shard")
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        """Total tokens over the shards."""
        return int(self.lengths.sum())

    def _counts(self, seq_len: int, epoch: bool) -> np.ndarray:
        per = (self.lengths - 1) // seq_len if epoch else self.lengths - seq_len
        return np.maximum(per, 0)

    def num_starts(self, seq_len: int) -> int:
        """Valid random starts of a window of seq_len + 1 tokens, over all shards."""
        return int(self._counts(seq_len, epoch=False).sum())

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping epoch windows (stride seq_len, seq_len + 1 tokens each), over all shards."""
        return int(self._counts(seq_len, epoch=True).sum())

    def locate(
        self, index: np.ndarray, seq_len: int, *, epoch: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, token offset) of the given start (random) or window (epoch) numbers."""
        ends = np.cumsum(self._counts(seq_len, epoch))
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= ends[-1]):
            raise IndexError(f"window numbers must lie in range({int(ends[-1])})")
        shard = np.searchsorted(ends, index, side="right")  # skips shards with no window
        local = index - np.concatenate([[0], ends])[shard]
        return shard, local * seq_len if epoch else local

    def windows(self, index: np.ndarray, seq_len: int, *, epoch: bool = False) -> np.ndarray:
        """int64 array (len(index), seq_len + 1): the windows with those numbers."""
        shard, offset = self.locate(index, seq_len, epoch=epoch)
        out = np.empty((len(shard), seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            out[i] = self.shards[s].tokens[o : o + seq_len + 1]
        return out


def _slots(weights: np.ndarray) -> np.ndarray:
    """Integer slots k_s ≥ 1 per source, Σ k_s = P ≤ MAX_PERIOD, with k_s / P ≈ the normalised weights.

    P is the smallest period at which rounding w_s·P matches every weight within 1e-9 (decimal or
    small-denominator weights are exact: 0.7/0.3 → 7/3 of P = 10); failing that, P = MAX_PERIOD with
    largest-remainder rounding (error < 1/P per source). Every source keeps at least one slot.
    """
    n = len(weights)
    periods = np.arange(n, MAX_PERIOD + 1)
    quotas = periods[:, None] * weights[None, :]
    k = np.rint(quotas)
    exact = (np.abs(quotas - k) <= 1e-9 * periods[:, None]).all(1) & (k >= 1).all(1) & (k.sum(1) == periods)
    if exact.any():
        return k[np.argmax(exact)].astype(np.int64)
    q = MAX_PERIOD * weights
    k = np.maximum(np.floor(q), 1).astype(np.int64)
    while (d := MAX_PERIOD - int(k.sum())) != 0:  # hand out / take back one slot at a time
        if d > 0:
            k[np.argmax(q - k)] += 1
        else:
            k[np.argmax(np.where(k > 1, k - q, -np.inf))] -= 1
    return k


def _schedule(k: np.ndarray) -> np.ndarray:
    """One period of a smooth weighted round-robin: slot i → source, source s on exactly k_s slots."""
    period, current = int(k.sum()), np.zeros(len(k), dtype=np.int64)
    sched = np.empty(period, dtype=np.int64)
    for i in range(period):
        current += k
        sched[i] = s = int(np.argmax(current))  # ties: the lowest source index
        current[s] -= period
    return sched


class BatchSampler:
    """Windows of one or several sources, stateless: a batch is a pure function of (seed, step, micro).

    ``sources``: a TokenShard, a ShardSet, or a list of ShardSets (a mixture; ``weights`` one positive
    float per source, default equal, normalised). Training row n = (step·micro_batches_per_step +
    micro)·micro_batch_size + r goes to source sched[n % P] as its local row
    j = (n // P)·k_s + (rank of the slot among the source's slots): exact proportions per period of P
    rows (see :func:`_slots`); one source is the identity j = n. The trainer passes
    ``micro = micro_step·world_size + rank``, so the global batch does not depend on the split.

    ``sampling="random"``: local row j takes a window at a uniform random start over all the source's
    shards, drawn by ``np.random.default_rng`` keyed by (train stream, seed, source, j // 64).
    ``sampling="epoch"``: local row j takes window perm_{seed,source,e}(j % W) of epoch e = j // W, for
    the W non-overlapping windows of the source; each epoch visits every window once, in its own order.

    ``batch`` returns int64 ``(inputs, targets)`` of shape (micro_batch_size, seq_len), targets =
    inputs shifted by one. ``eval_batches(n)`` yields the same n random-window batches every call,
    keyed by ``eval_seed`` (not the training seed); rank r takes the global eval batches r,
    r + world_size, …, and eval rows are assigned to sources by the same rule.
    """

    def __init__(
        self,
        sources: TokenShard | ShardSet | Sequence[ShardSet],
        *,
        weights: Sequence[float] | None = None,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        micro_batches_per_step: int = 1,
        sampling: str = "random",
        rank: int = 0,
        world_size: int = 1,
        eval_seed: int = EVAL_SEED,
    ):
        if isinstance(sources, TokenShard):
            sources = [ShardSet([sources])]
        elif isinstance(sources, ShardSet):
            sources = [sources]
        self.sources: list[ShardSet] = list(sources)
        if not self.sources or not all(isinstance(s, ShardSet) for s in self.sources):
            raise TypeError("sources must be a TokenShard, a ShardSet or a non-empty list of ShardSets")
        if seq_len < 1 or micro_batch_size < 1 or micro_batches_per_step < 1:
            raise ValueError(
                f"seq_len ({seq_len}), micro_batch_size ({micro_batch_size}) and "
                f"micro_batches_per_step ({micro_batches_per_step}) must be positive"
            )
        if seed < 0 or eval_seed < 0:
            raise ValueError(f"seeds must be non-negative (got seed={seed}, eval_seed={eval_seed})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if sampling not in ("random", "epoch"):
            raise ValueError(f"sampling must be 'random' or 'epoch' (got {sampling!r})")
        n = len(self.sources)
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"weights must be {n} positive finite numbers, one per source (got {weights})")
        if n > MAX_PERIOD:
            raise ValueError(f"at most {MAX_PERIOD} sources (got {n})")
        for i, src in enumerate(self.sources):
            if src.num_starts(seq_len) == 0:
                longest = int(np.argmax(src.lengths))
                many = len(src.shards) > 1
                where = f" (the longest of the {len(src.shards)} shards of source {i})" if many else ""
                raise DataError(
                    f"{src.shards[longest].path}: {src.lengths[longest]} tokens, "
                    f"fewer than seq_len + 1 = {seq_len + 1}{where}"
                )
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.micro_batches_per_step, self.sampling = micro_batches_per_step, sampling
        self.seed, self.eval_seed, self.rank, self.world_size = seed, eval_seed, rank, world_size
        self.weights = w / w.sum()
        self.slots = _slots(self.weights)  # k_s
        self.period = int(self.slots.sum())  # P
        self.effective_weights = self.slots / self.period
        self._sched = _schedule(self.slots)
        # _before[s, i]: slots of source s among the first i slots of the period
        self._before = np.zeros((n, self.period + 1), dtype=np.int64)
        self._before[:, 1:] = np.cumsum(self._sched[None, :] == np.arange(n)[:, None], axis=1)
        self._rank_in_period = self._before[self._sched, np.arange(self.period)]
        self._starts = [s.num_starts(seq_len) for s in self.sources]
        self._windows = [s.num_windows(seq_len) for s in self.sources]

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, local row j) of global row numbers."""
        rows = np.asarray(rows, dtype=np.int64)
        slot = rows % self.period
        src = self._sched[slot]
        return src, (rows // self.period) * self.slots[src] + self._rank_in_period[slot]

    def _random_starts(self, stream: int, seed: int, s: int, j: np.ndarray) -> np.ndarray:
        starts = np.empty(len(j), dtype=np.int64)
        for b in np.unique(j // _BLOCK).tolist():
            draws = np.random.default_rng([stream, seed, s, b]).integers(0, self._starts[s], size=_BLOCK)
            here = j // _BLOCK == b
            starts[here] = draws[j[here] % _BLOCK]
        return starts

    def _epoch_windows(self, s: int, j: np.ndarray) -> np.ndarray:
        w = self._windows[s]
        return feistel_permute(j % w, w, _key(_TRAIN_STREAM, self.seed, s, j // w))

    def _rows(
        self, rows: np.ndarray, stream: int, seed: int, epoch: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        src, j = self.assign(rows)
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(src).tolist():
            mine = src == s
            if epoch:
                index = self._epoch_windows(s, j[mine])
            else:
                index = self._random_starts(stream, seed, s, j[mine])
            out[mine] = self.sources[s].windows(index, self.seq_len, epoch=epoch)
        return torch.from_numpy(out[:, :-1].copy()), torch.from_numpy(out[:, 1:].copy())

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of global micro-batch ``micro_step`` (= micro_step·world_size + rank) of a step."""
        if step < 0 or micro_step < 0:
            raise ValueError(f"step ({step}) and micro_step ({micro_step}) must be non-negative")
        if micro_step >= self.micro_batches_per_step:
            raise ValueError(
                f"micro_step {micro_step} is not in [0, micro_batches_per_step={self.micro_batches_per_step})"
            )
        first = (step * self.micro_batches_per_step + micro_step) * self.micro_batch_size
        rows = first + np.arange(self.micro_batch_size, dtype=np.int64)
        return self._rows(rows, _TRAIN_STREAM, self.seed, epoch=self.sampling == "epoch")

    def eval_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(n):
            first = (k * self.world_size + self.rank) * self.micro_batch_size
            rows = first + np.arange(self.micro_batch_size, dtype=np.int64)
            yield self._rows(rows, _EVAL_STREAM, self.eval_seed, epoch=False)

    def tokens_seen(self, steps: int) -> list[int]:
        """Per source: training tokens (rows × seq_len) drawn in optimizer steps 0 … steps − 1."""
        if steps < 0:
            raise ValueError(f"steps ({steps}) must be non-negative")
        rows = steps * self.micro_batches_per_step * self.micro_batch_size
        full, rest = divmod(rows, self.period)
        return [(full * int(k) + int(self._before[s, rest])) * self.seq_len for s, k in enumerate(self.slots)]
