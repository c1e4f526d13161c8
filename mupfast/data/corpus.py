"""Reading a corpus: which files it has (:func:`corpus_files`) and their documents (:func:`read_documents`).

A corpus is ``"stdlib"`` (this Python's standard-library sources), a file, a directory, a glob, or a list
of them. Files are plain text (one document each), JSON Lines (``.jsonl`` / ``.json``, optionally
``.gz`` / ``.zst``; one document per line) or Parquet (one document per row). Every reader streams, so
memory stays bounded whatever the file's size. A problem the user must act on is a :class:`DataError`
whose one-line message names the file (and the line or row).
"""

from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Literal

import zstandard

from mupfast.errors import DataError

try:
    import orjson

    _json_loads: Any = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _json_loads = json.loads

STDLIB_EXCLUDED_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
# Multi-part suffix -> (format, compression); matched case-insensitively at the end of the name.
DATA_SUFFIXES = {
    ".jsonl": ("jsonl", "none"),
    ".json": ("jsonl", "none"),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".json.gz": ("jsonl", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".json.zst": ("jsonl", "zstd"),
    ".parquet": ("parquet", "none"),
}
SUPPORTED = ", ".join([*sorted(TEXT_SUFFIXES), *DATA_SUFFIXES])
BAD_RECORD_REASONS = ("not_utf8", "bad_json", "missing_field", "not_string")


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus. ``rel`` is its stable name: the posix path relative to the directory it
    was found under (the stdlib directory for ``"stdlib"``), or the path as written / globbed."""

    rel: str
    path: Path
    format: Literal["text", "jsonl", "parquet"]
    compression: Literal["none", "gzip", "zstd"] = "none"


# ----------------------------------------------------------------------------------------------
# Listing


def _classify(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix, kind in DATA_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return ("text", "none") if PurePath(lower).suffix in TEXT_SUFFIXES else None


def _walk(root: Path, skip_dirs: set[str], accept: Callable[[str], tuple | None]) -> list[CorpusFile]:
    """Files under root (hidden entries and skip_dirs pruned) for which accept(name) gives a kind."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            kind = None if name.startswith(".") else accept(name)
            if kind:
                path = Path(dirpath) / name
                found.append(CorpusFile(path.relative_to(root).as_posix(), path, *kind))
    if not found:
        raise DataError(f"data.corpus: no supported file under {root} (supported: {SUPPORTED})")
    return sorted(found, key=lambda f: f.rel)


def _stdlib_kind(name: str) -> tuple[str, str] | None:
    # As prepare.py always had it: *.py, minus the build-specific _sysconfigdata* module.
    return ("text", "none") if name.endswith(".py") and not name.startswith("_sysconfigdata") else None


def _entry_files(entry: str) -> list[CorpusFile]:
    if entry == "stdlib":
        return _walk(Path(sysconfig.get_paths()["stdlib"]), STDLIB_EXCLUDED_DIRS, _stdlib_kind)
    path = Path(os.path.expanduser(entry))
    if path.is_dir():
        return _walk(path, set(), _classify)
    if path.is_file():
        kind = _classify(path.name)
        if kind is None:
            raise DataError(f"data.corpus: {entry}: unsupported file type (supported: {SUPPORTED})")
        return [CorpusFile(path.name, path, *kind)]  # as before: a text file's header names the file
    if not glob.has_magic(entry):
        raise DataError(f"data.corpus: path does not exist: {entry}")
    matches = [Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True) if os.path.isfile(m)]
    if not matches:
        raise DataError(f"data.corpus: no file matches {entry!r}")
    found = [CorpusFile(m.as_posix(), m, *kind) for m in matches if (kind := _classify(m.name))]
    if not found:
        raise DataError(f"data.corpus: {entry!r} matches no supported file (supported: {SUPPORTED})")
    return sorted(found, key=lambda f: f.rel)


def corpus_files(corpus: str | Sequence[str]) -> list[CorpusFile]:
    """The corpus's files in a deterministic order: each entry's files sorted by ``rel``, the entries
    in the order given, a file named by several entries only at its first place."""
    entries = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not entries or any(not os.fspath(e) for e in entries):
        raise DataError("data.corpus: empty (give 'stdlib', a path, a glob or a list of them)")
    files, seen = [], set()
    for entry in entries:
        for f in _entry_files(os.fspath(entry)):
            key = f.path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def corpus_listing(files: list[CorpusFile]) -> list[tuple[str, int, int]]:
    """(rel, size in bytes, mtime_ns) per file: what a cache key of the corpus hashes."""
    listing = []
    for f in files:
        try:
            st = f.path.stat()
        except OSError as exc:
            raise DataError(f"{f.path}: cannot read ({exc.strerror})") from None
        listing.append((f.rel, st.st_size, st.st_mtime_ns))
    return listing


# ----------------------------------------------------------------------------------------------
# Reading


_Bad = Callable[[str, str], None]  # bad(reason, message): raise it, or count it and go on


class _ZstdSource:
    """A .zst file's bytes on their way to zstandard's stream_reader, which ends silently on a truncated
    frame: following the frame and block headers as they pass, this one knows whether the file ends
    between frames, and raises EOFError if not."""

    def __init__(self, raw: BinaryIO):
        self._raw, self._state, self._head, self._need = raw, "magic", b"", 4  # next: 4 bytes of magic
        self._skip = self._checksum = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if not data and (self._state != "magic" or self._head or self._skip):
            raise EOFError("the file ends inside a zstd frame")
        i = 0
        while i < len(data):
            if self._skip:  # the body of a block, a frame header's fields, a checksum: not looked at
                step = min(self._skip, len(data) - i)
                self._skip, i = self._skip - step, i + step
                continue
            take = min(self._need - len(self._head), len(data) - i)
            self._head, i = self._head + data[i : i + take], i + take
            if len(self._head) == self._need:
                self._advance()
        return data

    def _advance(self) -> None:
        head, self._head = int.from_bytes(self._head, "little"), b""
        if self._state == "magic":  # a wrong magic number is the decompressor's error to raise
            self._state, self._need = ("skippable", 4) if head >> 4 == 0x184D2A5 else ("descriptor", 1)
        elif self._state == "skippable":
            self._state, self._need, self._skip = "magic", 4, head
        elif self._state == "descriptor":  # then window descriptor, dictionary id, content size
            single = head >> 5 & 1
            self._skip = (1 - single) + (0, 1, 2, 4)[head & 3] + (single, 2, 4, 8)[head >> 6]
            self._state, self._need, self._checksum = "block", 3, head >> 2 & 1
        elif head & 1:  # the last block of the frame, then maybe a 4-byte checksum
            self._skip = (1 if head >> 1 & 3 == 1 else head >> 3) + 4 * self._checksum
            self._state, self._need = "magic", 4
        else:  # a block header: an RLE block (type 1) holds 1 byte, the others Block_Size bytes
            self._skip = 1 if head >> 1 & 3 == 1 else head >> 3


def _open_zstd(raw: BinaryIO) -> BinaryIO:
    reader = zstandard.ZstdDecompressor().stream_reader(_ZstdSource(raw), read_across_frames=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a bool", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "a number")


class _BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _json_text(line: bytes, text_field: str, lineno: int) -> str:
    """The document of one JSON Lines record, or _BadRecord saying why there is none."""
    array_hint = ""
    if lineno == 1 and line.lstrip().startswith(b"["):
        array_hint = "; mupfast reads JSON Lines (one object per line), not a JSON array"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRecord("not_utf8", f"not UTF-8 ({exc.reason} at position {exc.start})") from None
    try:
        record = _json_loads(decoded.removeprefix("\ufeff") if lineno == 1 else decoded)
    except (ValueError, RecursionError) as exc:
        raise _BadRecord("bad_json", f"not valid JSON ({_detail(exc)}){array_hint}") from None
    if not isinstance(record, dict):
        what = f"the record is {_json_type(record)}"
        raise _BadRecord("missing_field", f"no field {text_field!r} ({what}){array_hint}")
    if text_field not in record:
        names = [str(k) for k in record]
        fields = ", ".join(names[:10]) + (", …" if len(names) > 10 else "") if names else "none"
        raise _BadRecord("missing_field", f"no field {text_field!r} (fields: {fields})")
    text = record[text_field]
    if not isinstance(text, str):
        raise _BadRecord("not_string", f"field {text_field!r} is {_json_type(text)}, not a string")
    if b"\\ud" in line or b"\\uD" in line:  # an escaped lone surrogate has no UTF-8
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            message = f"field {text_field!r} is not valid Unicode ({exc.reason} at position {exc.start})"
            raise _BadRecord("not_utf8", message) from None
    return text


def _jsonl_documents(f: CorpusFile, text_field: str, bad: _Bad) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        with open(f.path, "rb") as raw:
            stream: BinaryIO = raw
            if f.compression == "gzip":
                stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
            elif f.compression == "zstd":
                stream = _open_zstd(raw)
            for lineno, line in enumerate(stream, 1):
                if line.isspace():
                    continue
                try:
                    text = _json_text(line, text_field, lineno)
                except _BadRecord as exc:
                    bad(exc.reason, f"{f.path}:{lineno}: {exc}")
                    continue
                yield lineno, text
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        what = "cannot read" if f.compression == "none" else f"corrupt or truncated {f.compression} stream"
        where = f"after line {lineno}" if lineno else "at the start"
        raise DataError(f"{f.path}: {what} {where} ({_detail(exc)})") from None


def _detail(exc: BaseException) -> str:
    """A one-line account of exc (JSON errors: without the parser's "line 1 column …", always 1 here)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, json.JSONDecodeError):  # orjson's JSONDecodeError is one too
        return f"{exc.msg} at position {exc.pos}"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _is_string_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _is_string_type(t.value_type)
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _parquet_documents(f: CorpusFile, text_field: str, bad: _Bad) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # buffer_size: read column chunks in pieces rather than whole, so memory stays bounded.
        pf = pq.ParquetFile(f.path, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{f.path}: not a readable Parquet file ({_detail(exc)})") from None
    group = 0
    try:
        schema = pf.schema_arrow
        if schema.get_field_index(text_field) < 0:
            raise DataError(
                f"{f.path}: no column {text_field!r} (columns: {', '.join(schema.names) or 'none'})"
            )
        column_type = schema.field(text_field).type
        if not _is_string_type(column_type):
            raise DataError(f"{f.path}: column {text_field!r} is {column_type}, not a string")
        start = 0  # global index of the row group's first row
        for group in range(pf.num_row_groups):
            r = 0
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        where = f"row group {group}, row {r}"
                        bad("not_string", f"{f.path}: {where}: field {text_field!r} is null")
                    else:
                        yield start + r, text
                    r += 1
            start += r
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{f.path}: cannot read Parquet row group {group} ({_detail(exc)})") from None
    finally:
        pf.close()


def _text_documents(f: CorpusFile, bad: _Bad) -> Iterator[tuple[int, str]]:
    try:
        data = f.path.read_bytes()
    except OSError as exc:
        raise DataError(f"{f.path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8").rstrip()
    except UnicodeDecodeError as exc:
        bad("not_utf8", f"{f.path}: not UTF-8 ({exc.reason} at position {exc.start})")
        return
    yield 0, f"# file: {f.rel}\n{text}\n\n"


def read_documents(
    f: CorpusFile,
    *,
    text_field: str = "text",
    on_bad_record: str = "error",
    skipped: collections.Counter | None = None,
) -> Iterator[tuple[int, str]]:
    """(record index, document text) of every document of f, streamed.

    The record index is 0 for a text file, the 1-based line number for JSON Lines, the 0-based row for
    Parquet. A bad record (not UTF-8, not JSON, no such field, not a string) raises a DataError naming
    the file and line, or with ``on_bad_record="skip"`` is left out and counted in ``skipped[reason]``.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")

    def bad(reason: str, message: str) -> None:
        if on_bad_record == "error":
            raise DataError(message)
        if skipped is not None:
            skipped[reason] += 1

    if f.format == "jsonl":
        return _jsonl_documents(f, text_field, bad)
    if f.format == "parquet":
        return _parquet_documents(f, text_field, bad)
    return _text_documents(f, bad)
