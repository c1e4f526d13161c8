"""Token shards: the on-disk format of tokenized data, writing it and reading it back checked.

A shard is a 64-byte header (magic ``MUPFTOK\\0``, version, vocab size, token count, tokenizer
fingerprint) followed by little-endian uint16 token ids. :func:`write_shard` writes one atomically;
:class:`TokenShard` validates and memmaps one. Every data problem is a :class:`DataError` with a
one-line message naming the file.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import numpy as np

from mupfast.data.tokenizer import MAX_VOCAB
from mupfast.errors import DataError

MAGIC = b"MUPFTOK\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, vocab size, token count, fingerprint; then padding


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and call, to write to before renaming."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, fingerprint: str) -> None:
    """Write tokens (1-D, ids < vocab_size ≤ 65536) as a shard, atomically (temp file + os.replace)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: tokens must be a 1-D integer array (got {tokens.dtype} {tokens.shape})")
    if not 0 < vocab_size <= MAX_VOCAB:
        raise DataError(f"{path}: vocab size {vocab_size} does not fit uint16 token ids")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(
            f"{path}: token ids span [{tokens.min()}, {tokens.max()}], outside vocab {vocab_size}"
        )
    fp = fingerprint.encode("ascii")
    if len(fp) > 32:
        raise DataError(f"{path}: tokenizer fingerprint longer than 32 characters: {fingerprint!r}")
    header = _HEADER.pack(MAGIC, VERSION, vocab_size, tokens.size, fp).ljust(HEADER_BYTES, b"\0")
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            tokens.astype("<u2", copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TokenShard:
    """A validated, memory-mapped shard: ``tokens`` (uint16 memmap), ``vocab_size``, ``fingerprint``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: token shard not found")
        size = self.path.stat().st_size
        if size < HEADER_BYTES:
            raise DataError(
                f"{self.path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)"
            )
        with open(self.path, "rb") as f:
            magic, version, vocab, count, fp = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{self.path}: not a mupfast token shard (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(
                f"{self.path}: unsupported shard version {version} (this mupfast reads {VERSION})"
            )
        if size != HEADER_BYTES + 2 * count:
            raise DataError(
                f"{self.path}: truncated shard: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes), file has {size} bytes"
            )
        if not 0 < vocab <= MAX_VOCAB:
            raise DataError(f"{self.path}: invalid vocab size {vocab} in the header")
        self.vocab_size: int = vocab
        self.fingerprint: str = fp.rstrip(b"\0").decode("ascii", errors="replace")
        if count:
            self.tokens = np.memmap(self.path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
        else:
            self.tokens = np.zeros(0, dtype="<u2")
        if count and (top := int(self.tokens.max())) >= vocab:
            at = int(np.argmax(self.tokens >= vocab))
            raise DataError(
                f"{self.path}: token id {top} (first bad one at position {at}) is out of range for vocab size {vocab}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, tokens={len(self)}, vocab_size={self.vocab_size})"
