"""Tokenizers: byte-level (no dependencies, vocab 256) and a BPE trained locally with HF ``tokenizers``.

Both have the same small interface: ``kind``, ``vocab_size``, ``fingerprint`` (a short stable hash
recorded in every token shard), ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and
``encode_arrays(texts) -> list[np.ndarray]`` (uint16, the fast path used when writing shards).

This module is ``mupfast.data.tokenizer``; it imports the HF package ``tokenizers`` lazily and by its
absolute name, which works as long as no file inside ``mupfast/`` is run directly as a script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MAX_VOCAB = 1 << 16  # token ids are stored as uint16


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless for any text, nothing to train."""

    kind = "byte"
    vocab_size = 256
    fingerprint = _short_hash(b"mupfast-byte-tokenizer-v1")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size=256, fingerprint={self.fingerprint!r})"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained with HF ``tokenizers``; stored as ``tokenizer.json``.

    The fingerprint is a hash of the tokenizer's JSON, so a trained tokenizer and its reload agree.
    """

    kind = "bpe"

    def __init__(self, json_str: str):
        from tokenizers import Tokenizer

        self._json = json_str
        self._tok = Tokenizer.from_str(json_str)
        self.vocab_size: int = self._tok.get_vocab_size()
        self.fingerprint: str = _short_hash(json_str.encode("utf-8"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
        """Train on ``texts`` (each a document); deterministic for the same texts and vocab size."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not 256 < vocab_size <= MAX_VOCAB:
            raise ValueError(f"BPE vocab_size must be in (256, {MAX_VOCAB}] (got {vocab_size})")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok.to_str())

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._json, encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint16) for e in self._tok.encode_batch(list(texts))]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def load_tokenizer(kind: str, directory: str | Path | None = None) -> ByteTokenizer | BPETokenizer:
    """The tokenizer of a prepared data directory (``tokenizer.json`` there for BPE)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if directory is None:
            raise ValueError("a BPE tokenizer is loaded from a directory holding tokenizer.json")
        return BPETokenizer.load(Path(directory) / "tokenizer.json")
    raise ValueError(f"tokenizer must be byte or bpe (got {kind!r})")
