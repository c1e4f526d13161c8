"""A prepared data directory, opened: its shards per split, their vocabulary and tokenizer.

:func:`load_prepared` checks every file (each shard's header, length and ids, the index's counts,
the tokenizer's fingerprint) and raises a :class:`~mupfast.errors.DataError` naming the file at the
first problem. It reads the current layout (``index.json`` listing ``train-*.bin`` / ``val-*.bin``)
and the first one (a ``train.bin`` and a ``val.bin`` of uint16 ids, counts in ``meta.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mupfast.data.sampler import ShardSet
from mupfast.data.shards import TokenShard
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer, load_saved_tokenizer
from mupfast.errors import DataError


@dataclass
class PreparedData:
    """A prepared data directory: each split's shards, their vocabulary and tokenizer."""

    dir: Path
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_kind: str
    train_shards: list[Path]
    val_shards: list[Path]
    meta: dict = field(default_factory=dict)
    reused: bool = False
    """True when prepare_data found the directory already prepared."""
    _opened: dict = field(default_factory=dict, repr=False)  # shards per split and the tokenizer, once read

    def tokenizer(self):
        """The directory's tokenizer, loaded once."""
        if "tokenizer" not in self._opened:
            if (self.dir / "mupfast_tokenizer.json").is_file():
                tok = load_saved_tokenizer(self.dir)
            elif self.tokenizer_kind == "bpe":  # a first-format directory: the BPE it trained (no EOS)
                tok = BPETokenizer.load(self.dir / "tokenizer.json")
            else:
                tok = ByteTokenizer()
            self._opened["tokenizer"] = tok
        return self._opened["tokenizer"]

    def shards(self, split: str) -> list[TokenShard]:
        """The split's shards, opened (and every id checked) once."""
        if split not in self._opened:
            paths = self.train_shards if split == "train" else self.val_shards
            self._opened[split] = [TokenShard(p) for p in paths]
        return self._opened[split]

    def train_set(self) -> ShardSet:
        return ShardSet(self.shards("train"))

    def val_set(self) -> ShardSet:
        return ShardSet(self.shards("val"))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_prepared(d: str | Path, reused: bool = True) -> PreparedData:
    """Open a prepared directory, checking every file; a problem is a DataError naming the file."""
    d = Path(d)
    meta = _read_json(d / "meta.json", "not a directory made by `mupfast prepare-data`")
    try:
        vocab, fingerprint, kind = meta["vocab_size"], meta["tokenizer_fingerprint"], meta["tokenizer"]
        if (d / "index.json").is_file():
            index = _read_json(d / "index.json", "the list of shards")
            listed = {s: [(d / e["file"], e["tokens"]) for e in index[s]] for s in ("train", "val")}
        else:  # the first format: one shard per split, counts in meta.json
            listed = {
                "train": [(d / "train.bin", meta["train_tokens"])],
                "val": [(d / "val.bin", meta["val_tokens"])],
            }
    except (KeyError, TypeError) as e:
        raise DataError(f"{d / 'meta.json'}: incomplete ({type(e).__name__}: {e})") from None
    data = PreparedData(
        d,
        vocab,
        fingerprint,
        kind,
        [p for p, _ in listed["train"]],
        [p for p, _ in listed["val"]],
        meta,
        reused,
    )
    for split in ("train", "val"):
        for shard, (_, count) in zip(data.shards(split), listed[split]):
            if shard.fingerprint != fingerprint:
                raise DataError(
                    f"{shard.path}: tokenizer fingerprint {shard.fingerprint} differs from meta.json's {fingerprint}"
                )
            if len(shard) != count:
                raise DataError(f"{shard.path}: {len(shard)} tokens, the index says {count}")
    try:
        tok = data.tokenizer()
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: tokenizer unreadable ({type(e).__name__}: {e})") from None
    if "index_format" in meta and tok.fingerprint != fingerprint:
        raise DataError(
            f"{d}: the tokenizer's fingerprint {tok.fingerprint} differs from meta.json's {fingerprint}"
        )
    return data


def find_prepared(d: Path, reused: bool = True) -> PreparedData | None:
    """The prepared data in d, or None when d is missing, incomplete or inconsistent (a cache miss)."""
    try:
        return load_prepared(d, reused)
    except DataError:
        return None
