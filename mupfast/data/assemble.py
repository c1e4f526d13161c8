"""Finished units into shards: each split's documents, in corpus order, cut into shards of about
``shard_tokens`` tokens at document boundaries, and ``index.json`` listing them.

The cut points depend only on the token stream, so the shards are the same whatever the number of
workers that made the units. Unit files are read in bounded slices (memory maps), never whole.
When the hash split held out no document at all (a corpus of fewer documents than about
1/val_fraction), the last val_fraction of the token stream is held out instead, as the first
format did, so there is always something to evaluate on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mupfast.data.shards import ShardWriter, token_dtype
from mupfast.data.units import SPLITS, Unit, unit_files

#: Tokens copied from a unit file into a shard at a time.
COPY_TOKENS = 1 << 24


class _SplitWriter:
    """One split's shards, cut at document boundaries once a shard holds ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, vocab_size: int, fingerprint: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.index: list[dict] = []
        self._writer: ShardWriter | None = None
        self._docs = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents (their ids back to back, and each one's length) appended in order."""
        start, first = 0, 0
        ends = np.cumsum(lengths)
        while first < len(lengths):
            if self._writer is None:
                name = f"{self.split}-{len(self.index):05d}.bin"
                self._writer = ShardWriter(self.out / name, self.vocab_size, self.fingerprint)
            room = self.shard_tokens - self._writer.count
            # the first document at whose end the shard is full (or the last one we have)
            last = min(int(np.searchsorted(ends - start, room)), len(lengths) - 1)
            stop = int(ends[last])
            for a in range(start, stop, COPY_TOKENS):
                self._writer.write(np.asarray(tokens[a : min(stop, a + COPY_TOKENS)]))
            self._docs += last - first + 1
            start, first = stop, last + 1
            if self._writer.count >= self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        w = self._writer
        w.close()
        self.index.append({"file": w.path.name, "tokens": w.count, "documents": self._docs})
        self._writer, self._docs = None, 0

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish()
        return self.index


def _split_documents(lengths: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray]:
    """Document lengths before and after token ``at``; a document cut there counts on both sides."""
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, at, side="right"))  # documents wholly before the cut
    head = list(lengths[:k])
    tail = list(lengths[k:])
    inside = at - (int(ends[k - 1]) if k else 0)
    if inside and tail:
        head.append(inside)
        tail[0] -= inside
    return np.array(head, dtype="<i8"), np.array([x for x in tail if x], dtype="<i8")


def _read_unit(work: Path, index: int, split: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    tok_path, len_path = unit_files(work, index, split)
    lengths = np.fromfile(len_path, dtype="<i8")
    tokens = np.memmap(tok_path, dtype=dtype, mode="r") if tok_path.stat().st_size else np.zeros(0, dtype)
    return tokens, lengths


def assemble(
    work: Path,
    out: Path,
    units: list[Unit],
    counts: dict[int, dict],
    *,
    vocab_size: int,
    fingerprint: str,
    shard_tokens: int,
    val_fraction: float,
) -> dict:
    """Write every split's shards into ``out`` from the units (``counts``: each unit's counts);
    returns the index (also written as index.json)."""
    writers = {s: _SplitWriter(out, s, vocab_size, fingerprint, shard_tokens) for s in SPLITS}
    dtype = token_dtype(vocab_size)  # the unit files hold the tokenizer's ids in this type
    held_out = any(counts[u.index]["val_documents"] for u in units)
    train_tokens = sum(counts[u.index]["train_tokens"] for u in units)
    # nothing held out (a corpus of fewer documents than 1/val_fraction): the stream's tail is validation
    budget = (
        None if held_out else train_tokens - min(max(1, round(val_fraction * train_tokens)), train_tokens - 1)
    )
    for u in units:
        for split in SPLITS:
            tokens, lengths = _read_unit(work, u.index, split, dtype)
            if not lengths.size:
                continue
            if budget is not None and split == "train":
                keep = min(budget, len(tokens))
                budget -= keep
                head, tail = _split_documents(lengths, keep)
                if head.size:
                    writers["train"].add(tokens[:keep], head)
                if tail.size:
                    writers["val"].add(tokens[keep:], tail)
                continue
            writers[split].add(tokens, lengths)
    index = {
        "format": 2,
        "vocab_size": vocab_size,
        "tokenizer_fingerprint": fingerprint,
        "token_bytes": dtype.itemsize,
        **{split: writers[split].close() for split in SPLITS},
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index
