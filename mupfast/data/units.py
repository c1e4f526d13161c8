"""Units of preparation work: the corpus cut into pieces that are tokenized independently.

A unit is a run of corpus files (one JSON Lines or Parquet file, or up to a few dozen text files);
the plan depends only on the corpus and the optional byte cap, never on how many workers run it.
:func:`tokenize_unit` reads a unit's documents, tokenizes them ([BOS] + ids + [EOS] each), holds
out the validation documents by a hash of their position, and writes four files per unit —
``u<i>.{train,val}.tok`` (the ids) and ``u<i>.{train,val}.len`` (each document's length) — then
``u<i>.json`` (its counts) last, so a unit with a ``.json`` is complete: a killed preparation
starts again from the first unit without one. Memory stays bounded: documents are read,
tokenized and written a batch at a time.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mupfast.atomic import temp_path, write_text_atomically
from mupfast.data.corpus import CorpusFile, read_documents
from mupfast.errors import DataError

#: Text files grouped into one unit: at most this many files or bytes (stdlib: ~600 small files).
TEXT_FILES_PER_UNIT, TEXT_BYTES_PER_UNIT = 64, 16 << 20
#: Documents (or bytes of text) tokenized per batch inside a unit.
BATCH_DOCS, BATCH_BYTES = 1024, 8 << 20
SPLITS = ("train", "val")


#: Where a corpus cap ends (:func:`cap_limits`): {file index: (documents it keeps, bytes of its last)}.
Caps = dict[int, tuple[int, int]]


@dataclass(frozen=True)
class Unit:
    """Files ``files`` (indices into the corpus listing) tokenized together."""

    index: int
    files: tuple[int, ...]


def plan_units(files: list[CorpusFile], caps: Caps) -> list[Unit]:
    """Consecutive text files grouped, every other file a unit of its own, up to the file the cap
    ``caps`` ends in (all of them without a cap)."""
    last = max(caps) if caps else len(files) - 1
    units: list[Unit] = []
    group: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if group:
            units.append(Unit(len(units), tuple(group)))
        group, size = [], 0

    for i, f in enumerate(files[: last + 1]):
        if f.format != "text":
            flush()
            units.append(Unit(len(units), (i,)))
            continue
        file_size = f.path.stat().st_size
        if len(group) == TEXT_FILES_PER_UNIT or (group and size + file_size > TEXT_BYTES_PER_UNIT):
            flush()
        group.append(i)
        size += file_size
    flush()
    return units


def cap_limits(files: list[CorpusFile], max_bytes: int, **read) -> Caps:
    """Where a cap of ``max_bytes`` of document text ends: {file index: (documents, last one's bytes)}.

    Reads the corpus in order only as far as the cap (so it costs O(cap)); an empty dict when the
    whole corpus fits. The document that crosses the cap keeps its first bytes, cut at a character.
    """
    total = 0
    for i, f in enumerate(files):
        for n, (_, text) in enumerate(read_documents(f, **read), start=1):
            size = len(text.encode("utf-8"))
            if total + size >= max_bytes:
                return {i: (n, max_bytes - total)}
            total += size
    return {}


def capped_documents(
    files: list[CorpusFile], indices, caps: Caps, **read
) -> Iterator[tuple[CorpusFile, int, str]]:
    """(file, record, text) of the files ``indices`` in order, ending where the cap ``caps`` does:
    the document it ends in keeps its first bytes, cut at a character."""
    for i in indices:
        if caps and i > max(caps):
            return
        limit = caps.get(i)
        for n, (record, text) in enumerate(read_documents(files[i], **read), start=1):
            if limit is not None and n == limit[0]:
                yield files[i], record, text.encode("utf-8")[: limit[1]].decode("utf-8", errors="ignore")
                break
            yield files[i], record, text


def is_val(rel: str, record: int, val_fraction: float) -> bool:
    """Whether a document is held out: a hash of its position (file, record) below the fraction."""
    digest = hashlib.blake2b(f"{rel}\0{record}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def unit_done(work: Path, index: int) -> dict | None:
    """The counts of a finished unit, or None when it has not finished."""
    try:
        return json.loads((work / f"u{index:06d}.json").read_text())
    except (OSError, ValueError):
        return None


def unit_files(work: Path, index: int, split: str) -> tuple[Path, Path]:
    return work / f"u{index:06d}.{split}.tok", work / f"u{index:06d}.{split}.len"


def tokenize_unit(
    unit: Unit,
    files: list[CorpusFile],
    tokenizer,
    work: Path,
    *,
    caps: Caps,
    text_field: str,
    on_bad_record: str,
    val_fraction: float,
) -> dict:
    """Tokenize one unit into its files under ``work``; returns (and writes) its counts."""
    skipped: collections.Counter = collections.Counter()
    outs = {s: [open(temp_path(p), "wb") for p in unit_files(work, unit.index, s)] for s in SPLITS}
    counts = {f"{s}_{k}": 0 for s in SPLITS for k in ("documents", "tokens")}
    counts["text_bytes"] = 0
    batch: list[tuple[str, bool]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        arrays = tokenizer.encode_documents([text for text, _ in batch])
        for split, flag in (("train", False), ("val", True)):
            chosen = [a for a, (_, v) in zip(arrays, batch) if v == flag]
            if chosen:
                tok, lens = outs[split]
                np.concatenate(chosen).tofile(tok)
                np.array([len(a) for a in chosen], dtype="<i8").tofile(lens)
                counts[f"{split}_documents"] += len(chosen)
                counts[f"{split}_tokens"] += sum(len(a) for a in chosen)
        batch, batch_bytes = [], 0

    read = dict(text_field=text_field, on_bad_record=on_bad_record, skipped=skipped)
    try:
        for f, record, text in capped_documents(files, unit.files, caps, **read):
            if tokenizer.kind == "byte" and "\0" in text:
                where = f"{f.path}" + (f":{record}" if f.format == "jsonl" else f", record {record}")
                if on_bad_record == "error":
                    raise DataError(f"{where}: holds a NUL byte, the byte tokenizer's end of document")
                skipped["nul_byte"] += 1
                continue
            batch.append((text, is_val(f.rel, record, val_fraction)))
            batch_bytes += len(text)
            counts["text_bytes"] += len(text.encode("utf-8"))
            if len(batch) >= BATCH_DOCS or batch_bytes >= BATCH_BYTES:
                flush()
        flush()
    except BaseException:
        for handles in outs.values():
            for h in handles:
                h.close()
                Path(h.name).unlink(missing_ok=True)
        raise
    for split, handles in outs.items():
        for h, final in zip(handles, unit_files(work, unit.index, split)):
            h.flush()
            os.fsync(h.fileno())
            h.close()
            os.replace(h.name, final)
    counts["skipped"] = dict(sorted(skipped.items()))
    # last: the unit's mark of completion
    write_text_atomically(work / f"u{unit.index:06d}.json", json.dumps(counts, sort_keys=True))
    return counts
