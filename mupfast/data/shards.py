"""Token shards: the on-disk format of tokenized data, writing it and reading it back checked.

A shard is a 64-byte header followed by the token ids, little-endian. Version 2 (written now):
magic ``MUPFTOK\\0``, version, vocab size, token count, tokenizer fingerprint, bytes per id (2 for
uint16 ids when the vocabulary fits in 65,536, 4 for uint32 above). Version 1 (still read) had no
width field and always uint16 ids. :class:`ShardWriter` streams a shard to disk and puts it in
place atomically; :func:`write_shard` writes one array; :class:`TokenShard` validates and memmaps
one. Every data problem is a :class:`~mupfast.errors.DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from mupfast.atomic import temp_path
from mupfast.errors import DataError

MAGIC = b"MUPFTOK\0"
VERSION = 2
READS = (1, 2)  # the versions TokenShard reads
HEADER_BYTES = 64
_HEADER_V1 = struct.Struct("<8sIIQ32s")  # magic, version, vocab size, token count, fingerprint
_HEADER = struct.Struct("<8sIIQ32sI")  # … and bytes per token id; then zero padding to 64 bytes
MAX_VOCAB = 1 << 32


def token_dtype(vocab_size: int) -> np.dtype:
    """The id type of a vocabulary: uint16 when every id fits, uint32 above."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _header(vocab_size: int, count: int, fingerprint: str, width: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, vocab_size, count, fingerprint.encode("ascii"), width).ljust(
        HEADER_BYTES, b"\0"
    )


class ShardWriter:
    """Streams token ids into a new shard: ``write`` appends arrays, ``close`` finishes it atomically.

    The file is written under a temporary name and renamed into place only by ``close``, so a
    crash leaves no half shard under the real name. Ids are checked against the vocabulary as
    they come. Use it as a context manager (an exception discards the file).
    """

    def __init__(self, path: str | Path, vocab_size: int, fingerprint: str):
        self.path = Path(path)
        if not 0 < vocab_size <= MAX_VOCAB:
            raise DataError(f"{self.path}: vocab size {vocab_size} does not fit uint32 token ids")
        if len(fingerprint.encode("ascii")) > 32:
            raise DataError(f"{self.path}: tokenizer fingerprint longer than 32 characters: {fingerprint!r}")
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        self._tmp = temp_path(self.path)
        self._file = open(self._tmp, "wb")
        self._file.write(_header(vocab_size, 0, fingerprint, self.dtype.itemsize))

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(
                f"{self.path}: tokens must be a 1-D integer array (got {tokens.dtype} {tokens.shape})"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(
                f"{self.path}: token ids span [{tokens.min()}, {tokens.max()}], outside vocab {self.vocab_size}"
            )
        tokens.astype(self.dtype, copy=False).tofile(self._file)
        self.count += tokens.size

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_header(self.vocab_size, self.count, self.fingerprint, self.dtype.itemsize))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, fingerprint: str) -> None:
    """Write one array of ids (< vocab_size) as a shard, atomically."""
    with ShardWriter(path, vocab_size, fingerprint) as w:
        w.write(tokens)


class TokenShard:
    """A validated, memory-mapped shard: ``tokens`` (a uint16 or uint32 memmap), ``vocab_size``,
    ``fingerprint``, ``version``. Every id is checked against the vocabulary on opening."""

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
            raw = f.read(HEADER_BYTES)
        magic, version = raw[:8], struct.unpack_from("<I", raw, 8)[0]
        if magic != MAGIC:
            raise DataError(f"{self.path}: not a mupfast token shard (magic {magic!r}, expected {MAGIC!r})")
        if version not in READS:
            raise DataError(
                f"{self.path}: unsupported shard version {version} (this mupfast reads versions "
                f"{' and '.join(map(str, READS))})"
            )
        if version == 1:
            _, _, vocab, count, fp = _HEADER_V1.unpack_from(raw)
            width = 2
        else:
            _, _, vocab, count, fp, width = _HEADER.unpack_from(raw)
        if width not in (2, 4) or not 0 < vocab <= (1 << (8 * width)):
            raise DataError(f"{self.path}: invalid vocab size {vocab} or id width {width} in the header")
        if size != HEADER_BYTES + width * count:
            raise DataError(
                f"{self.path}: truncated shard: header says {count} tokens "
                f"({HEADER_BYTES + width * count} bytes), file has {size} bytes"
            )
        self.version: int = version
        self.vocab_size: int = vocab
        self.fingerprint: str = fp.rstrip(b"\0").decode("ascii", errors="replace")
        dtype = f"<u{width}"
        if count:
            self.tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
        else:
            self.tokens = np.zeros(0, dtype=dtype)
        if count and (top := int(self.tokens.max())) >= vocab:
            at = int(np.argmax(self.tokens >= vocab))
            raise DataError(
                f"{self.path}: token id {top} (first bad one at position {at}) is out of range for vocab size {vocab}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, tokens={len(self)}, vocab_size={self.vocab_size})"
