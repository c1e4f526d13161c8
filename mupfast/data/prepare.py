"""Data preparation: reading a corpus, tokenizing it, and the prepared directory of shards it makes.

:func:`prepare_data` turns a corpus (``"stdlib"``: this Python's standard-library sources, or a text
file / directory) into ``train.bin`` / ``val.bin`` shards (:mod:`mupfast.data.shards`) in a
directory named by a hash of everything that determines them; a second call finds them and does no
work. :func:`load_prepared` opens such a directory, checking every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mupfast.config import DataConfig, load_config
from mupfast.data.shards import TokenShard, temp_path, write_shard
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from mupfast.errors import DataError

# ----------------------------------------------------------------------------------------------
# Corpus

STDLIB_EXCLUDED_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
}
USER_SUFFIXES = {".txt", ".md", ".py", ".rst"}


def corpus_files(corpus: str) -> list[tuple[str, Path]]:
    """The corpus's files as (relative posix path, path), sorted by relative path.

    ``"stdlib"``: ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` minus test directories, idlelib,
    lib2to3, site-/dist-packages and the build-specific ``_sysconfigdata*`` module. Otherwise a text
    file, or a directory searched recursively for .txt/.md/.py/.rst (hidden entries skipped).
    """
    if corpus == "stdlib":
        root, suffixes, skip = Path(sysconfig.get_paths()["stdlib"]), {".py"}, STDLIB_EXCLUDED_DIRS
    else:
        root, suffixes, skip = Path(corpus), USER_SUFFIXES, set()
        if root.is_file():
            return [(root.name, root)]
        if not root.is_dir():
            raise DataError(f"corpus not found: {corpus}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if Path(name).suffix in suffixes and not name.startswith((".", "_sysconfigdata")):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path))
    if not files:
        raise DataError(f"corpus {corpus}: no {'/'.join(sorted(suffixes))} files found under {root}")
    return sorted(files)


def read_corpus(files: list[tuple[str, Path]], max_bytes: int = 0) -> list[str]:
    """Documents ``"# file: <rel>\\n<text>\\n\\n"`` in order, cut so that their UTF-8 total ≤ max_bytes (0: no cap)."""
    docs, total = [], 0
    for rel, path in files:
        text = path.read_bytes().decode("utf-8", errors="replace").rstrip()
        doc = f"# file: {rel}\n{text}\n\n"
        size = len(doc.encode("utf-8"))
        if max_bytes and total + size > max_bytes:
            cut = doc.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            if cut:
                docs.append(cut)
            break
        docs.append(doc)
        total += size
    return docs


# ----------------------------------------------------------------------------------------------
# Preparation

PREP_FORMAT = 1  # bump when the corpus reading or splitting changes, to invalidate old directories


@dataclass
class PreparedData:
    """A prepared data directory: train/val shards, their vocab and tokenizer."""

    dir: Path
    train_path: Path
    val_path: Path
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_kind: str = "byte"
    reused: bool = False
    """True when prepare_data found the directory already prepared."""

    def tokenizer(self) -> ByteTokenizer | BPETokenizer:
        return load_tokenizer(self.tokenizer_kind, self.dir)

    def train_shard(self) -> TokenShard:
        return TokenShard(self.train_path)

    def val_shard(self) -> TokenShard:
        return TokenShard(self.val_path)


def _source_key(cfg: DataConfig, files: list[tuple[str, Path]]) -> dict:
    if cfg.corpus == "stdlib":
        listing = [(rel, p.stat().st_size) for rel, p in files]
        source = {"corpus": "stdlib", "python": ".".join(map(str, sys.version_info[:3]))}
    else:
        listing = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files]
        source = {"corpus": str(Path(cfg.corpus).resolve())}
    source["files"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {
        "format": PREP_FORMAT,
        "source": source,
        "max_corpus_bytes": cfg.max_corpus_bytes,
        "tokenizer": cfg.tokenizer,
        "bpe_vocab_size": cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None,
        "val_fraction": cfg.val_fraction,
    }


def _dir_name(cfg: DataConfig, key: dict) -> str:
    stem = "stdlib" if cfg.corpus == "stdlib" else re.sub(r"[^A-Za-z0-9_.]+", "_", Path(cfg.corpus).stem)
    tok = "byte" if cfg.tokenizer == "byte" else f"bpe{cfg.bpe_vocab_size}"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{stem}-{tok}-{digest}"


def load_prepared(d: str | Path, reused: bool = True) -> PreparedData:
    """Open a prepared directory, checking every file; a problem is a DataError naming the file."""
    d = Path(d)
    meta_path = d / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        vocab, fingerprint, kind = meta["vocab_size"], meta["tokenizer_fingerprint"], meta["tokenizer"]
        counts = (meta["train_tokens"], meta["val_tokens"])
    except FileNotFoundError:
        raise DataError(f"{meta_path}: missing (not a directory made by `mupfast prepare-data`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable or incomplete ({type(e).__name__}: {e})") from None
    train, val = TokenShard(d / "train.bin"), TokenShard(d / "val.bin")
    data = PreparedData(d, train.path, val.path, vocab, fingerprint, kind, reused)
    for shard, count in ((train, counts[0]), (val, counts[1])):
        if shard.fingerprint != fingerprint:
            raise DataError(
                f"{shard.path}: tokenizer fingerprint {shard.fingerprint} differs from meta.json's {fingerprint}"
            )
        if len(shard) != count:
            raise DataError(f"{shard.path}: {len(shard)} tokens, meta.json says {count}")
    try:
        tok_fp = data.tokenizer().fingerprint
    except (OSError, ValueError) as e:
        raise DataError(f"{d}: tokenizer unreadable ({type(e).__name__}: {e})") from None
    if tok_fp != fingerprint:
        raise DataError(
            f"{d / 'tokenizer.json'}: fingerprint {tok_fp} differs from meta.json's {fingerprint}"
        )
    return data


def _load_prepared(d: Path, reused: bool = True) -> PreparedData | None:
    """The prepared data in d, or None when d is missing, incomplete or inconsistent (a cache miss)."""
    try:
        return load_prepared(d, reused)
    except DataError:
        return None


def prepare_data(cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """Tokenize the corpus into ``<cfg.dir>/<name>-<hash>/{train,val}.bin`` (+ tokenizer.json, meta.json).

    Idempotent: when that directory already holds valid shards they are returned (``reused=True``).
    Deterministic: the same corpus and settings give byte-identical files. The val split is the last
    ``val_fraction`` of the token stream (contiguous held-out text). Files are written to a temp dir
    renamed into place, so concurrent processes never see half-written data and all end with a
    valid directory.
    """
    from tqdm.auto import tqdm

    files = corpus_files(cfg.corpus)
    key = _source_key(cfg, files)
    out = Path(cfg.dir) / _dir_name(cfg, key)
    if (done := _load_prepared(out)) is not None:
        return done

    docs = read_corpus(files, cfg.max_corpus_bytes)
    if cfg.tokenizer == "bpe":
        tok: ByteTokenizer | BPETokenizer = BPETokenizer.train(docs, cfg.bpe_vocab_size, progress=progress)
    else:
        tok = ByteTokenizer()
    corpus_bytes = sum(len(d.encode("utf-8")) for d in docs)
    parts: list[np.ndarray] = []
    with tqdm(
        total=corpus_bytes, unit="B", unit_scale=True, desc=f"tokenizing {out.name}", disable=not progress
    ) as bar:
        for i in range(0, len(docs), 64):
            chunk = docs[i : i + 64]
            parts.extend(tok.encode_arrays(chunk))
            bar.update(sum(len(d.encode("utf-8")) for d in chunk))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    n = len(tokens)
    if n < 2:
        raise DataError(f"corpus {cfg.corpus}: only {n} tokens, too few to split into train and val")
    n_val = min(max(1, round(n * cfg.val_fraction)), n - 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        write_shard(tmp / "train.bin", tokens[: n - n_val], tok.vocab_size, tok.fingerprint)
        write_shard(tmp / "val.bin", tokens[n - n_val :], tok.vocab_size, tok.fingerprint)
        if isinstance(tok, BPETokenizer):
            tok.save(tmp / "tokenizer.json")
        meta = {
            "name": out.name,
            "key": key,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint,
            "documents": len(docs),
            "corpus_bytes": corpus_bytes,
            "train_tokens": n - n_val,
            "val_tokens": n_val,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = _load_prepared(out, reused=False)
    if data is None:
        raise DataError(f"{out}: prepared data failed validation right after writing")
    return data


def _install(tmp: Path, out: Path) -> None:
    """Rename tmp to out; if another process got there first with valid data, keep theirs."""
    for _ in range(3):
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
            if _load_prepared(out) is not None:
                return  # a concurrent process won the race
            stale = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.stale"
            try:
                os.rename(out, stale)  # move the broken directory aside, then retry
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"{out}: could not install the prepared data (directory keeps changing)")


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``prepare-data`` has no flags of its own: the data section of the config says everything."""


def run(args: argparse.Namespace) -> int:
    """The ``prepare-data`` verb: prepare (or find) the shards and say where they are."""
    prepared = prepare_data(load_config(args.config, args.overrides).data)
    print(f"prepared {prepared.dir} (vocab {prepared.vocab_size})")
    return 0
