"""Data preparation: a corpus tokenized into shards, in parallel, resumably; and opening the result.

:func:`prepare_data` (the ``prepare-data`` verb; the trainer calls it too) reads the corpus
(:mod:`~mupfast.data.corpus`), cuts it into units (:mod:`~mupfast.data.units`) that ``workers``
processes tokenize independently, then cuts the token stream into shards
(:mod:`~mupfast.data.assemble`). The result lives in a directory named by a hash of everything
that determines it — corpus listing, reading settings, tokenizer, split, shard size, not the
worker count — so a second call finds it and does no work, and a changed corpus never reuses
stale shards. Work in progress sits in ``.<name>.partial`` beside it: a killed preparation keeps
its finished units and continues from there. Concurrent preparations of the same data end with
one valid directory. The directory it makes is opened by :func:`~mupfast.data.prepared.load_prepared`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

from mupfast.config import DataConfig, load_config
from mupfast.data.assemble import assemble
from mupfast.data.corpus import CorpusFile, corpus_files, corpus_listing
from mupfast.data.prepared import PreparedData, find_prepared, load_prepared
from mupfast.data.tokenizer import BPETokenizer, load_saved_tokenizer, load_tokenizer
from mupfast.data.units import Caps, Unit, cap_limits, capped_documents, plan_units, tokenize_unit, unit_done
from mupfast.errors import ConfigError, DataError

PREP_FORMAT = 2  # bump when reading, splitting or the shard layout changes, to invalidate old directories


# ----------------------------------------------------------------------------------------------
# Preparing


def _source_key(cfg: DataConfig, files: list[CorpusFile]) -> dict:
    """What the corpus contributes to the cache key: which files, as they are now."""
    if cfg.corpus == "stdlib":  # the embedded corpus: this Python's version, not file times
        listing = [(rel, size) for rel, size, _ in corpus_listing(files)]
        source: dict = {"corpus": "stdlib", "python": ".".join(map(str, sys.version_info[:3]))}
    else:
        listing = corpus_listing(files)
        corpus = [cfg.corpus] if isinstance(cfg.corpus, str) else list(cfg.corpus)
        source = {"corpus": [str(Path(c).resolve()) if Path(c).exists() else c for c in corpus]}
    source["files"] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return source


def _dir_name(cfg: DataConfig, key: dict) -> str:
    corpus = cfg.corpus if isinstance(cfg.corpus, str) else cfg.corpus[0]
    stem = (
        "stdlib" if corpus == "stdlib" else re.sub(r"[^A-Za-z0-9_.]+", "_", Path(corpus).name.split("*")[0])
    )
    tok = {"byte": "byte", "bpe": f"bpe{cfg.bpe_vocab_size}"}.get(cfg.tokenizer, "hf")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{stem.strip('._') or 'corpus'}-{tok}-{digest}"


def _trained_bpe(
    cfg: DataConfig, files: list[CorpusFile], caps: Caps, tok_dir: Path, read: dict, progress: bool
):
    """The BPE trained on the corpus as the shards will hold it (streamed, the cap included), or the
    one an interrupted preparation already trained and saved in ``tok_dir``."""
    if (tok_dir / "mupfast_tokenizer.json").is_file():
        return load_saved_tokenizer(tok_dir)
    texts = (text for _, _, text in capped_documents(files, range(len(files)), caps, **read))
    return BPETokenizer.train(texts, cfg.bpe_vocab_size, progress=progress)


def _run_units(todo: list[Unit], files, tok_dir: Path, work: Path, settings: dict, workers: int, bar):
    """Tokenize the units not yet done (``settings``: tokenize_unit's keywords): in this process,
    or on ``workers`` spawned processes with at most two units each in flight, so memory and
    unread results stay bounded."""
    if workers <= 1:
        tok = load_saved_tokenizer(tok_dir)
        for unit in todo:
            bar(tokenize_unit(unit, files, tok, work, **settings))
        return
    ctx = multiprocessing.get_context("spawn")  # no forked tokenizer thread pools; the same on every OS
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_dir),)) as pool:
        pending = []
        for unit in todo:
            pending.append(pool.apply_async(_worker_unit, (unit, files, str(work), settings)))
            while len(pending) >= 2 * workers or (pending and pending[0].ready()):
                bar(pending.pop(0).get())
        for p in pending:
            bar(p.get())


_WORKER_TOKENIZER = None


def _init_worker(tok_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the workers are the parallelism
    _WORKER_TOKENIZER = load_saved_tokenizer(Path(tok_dir))


def _worker_unit(unit: Unit, files, work: str, settings: dict) -> dict:
    return tokenize_unit(unit, files, _WORKER_TOKENIZER, Path(work), **settings)


class _Progress:
    """Documents, tokens and tokens/s of the units as they finish (a bar on a terminal, log lines in a file)."""

    def __init__(self, total: int, done: list[dict], name: str, enabled: bool):
        from mupfast.progress import progress_bar

        self.bar = progress_bar(
            total, initial=len(done), desc=f"preparing {name}", unit="unit", disable=not enabled
        )
        self.docs = sum(c["train_documents"] + c["val_documents"] for c in done)
        self.tokens = sum(c["train_tokens"] + c["val_tokens"] for c in done)
        self.t0, self.new_tokens = time.perf_counter(), 0

    def __call__(self, counts: dict) -> None:
        self.docs += counts["train_documents"] + counts["val_documents"]
        n = counts["train_tokens"] + counts["val_tokens"]
        self.tokens, self.new_tokens = self.tokens + n, self.new_tokens + n
        rate = self.new_tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s")
        self.bar.update(1)


def prepare_data(cfg: DataConfig, *, progress: bool = True, workers: int | None = None) -> PreparedData:
    """Tokenize the corpus into ``<cfg.dir>/<name>-<hash>/`` (shards, index.json, meta.json, tokenizer).

    Idempotent (an existing valid directory is returned, ``reused=True``), deterministic (the same
    corpus and settings give byte-identical files for any ``workers``: default ``cfg.workers``, 0
    meaning one per core), resumable, bounded in memory. Validation documents are chosen by a hash
    of their position (see :func:`~mupfast.data.units.is_val`).
    """
    files = corpus_files(cfg.corpus)
    read = {"text_field": cfg.text_field, "on_bad_record": cfg.on_bad_record}
    given = None if cfg.tokenizer == "bpe" else load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token)
    key = {
        "format": PREP_FORMAT,
        "source": _source_key(cfg, files),
        **read,
        "max_corpus_bytes": cfg.max_corpus_bytes,
        # a trained BPE is a function of the corpus, which the key covers
        "tokenizer": {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size}
        if given is None
        else {"fingerprint": given.fingerprint},
        "eos_token": cfg.eos_token,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
    }
    out = Path(cfg.dir) / _dir_name(cfg, key)
    if (done := find_prepared(out)) is not None:
        return done
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    caps = cap_limits(files, cfg.max_corpus_bytes, **read) if cfg.max_corpus_bytes else {}
    tok_dir = work / "tokenizer"  # what the workers load; a resume finds a trained BPE here
    tok = given or _trained_bpe(cfg, files, caps, tok_dir, read, progress)
    if not (tok_dir / "mupfast_tokenizer.json").is_file():
        tok_dir.mkdir(exist_ok=True)
        tok.save(tok_dir)
    units = plan_units(files, caps)
    counts = {u.index: c for u in units if (c := unit_done(work, u.index)) is not None}
    todo = [u for u in units if u.index not in counts]
    n_workers = min(workers or cfg.workers or os.cpu_count() or 1, max(1, len(todo)))
    bar = _Progress(len(units), list(counts.values()), out.name, progress)
    settings = dict(caps=caps, **read, val_fraction=cfg.val_fraction)
    _run_units(todo, files, tok_dir, work, settings, n_workers, bar)
    bar.bar.close()
    counts = {u.index: unit_done(work, u.index) for u in units}
    total = sum(c["train_tokens"] + c["val_tokens"] for c in counts.values())
    if total < 2:
        raise DataError(f"corpus {cfg.corpus}: only {total} tokens, too few to split into train and val")
    skipped = sum((Counter(c["skipped"]) for c in counts.values()), Counter())
    if skipped:
        what = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items()))
        print(f"prepare-data: skipped {sum(skipped.values())} bad records ({what})", file=sys.stderr)
    try:
        return _assemble_and_install(cfg, key, out, work, units, counts, tok, dict(skipped))
    except (OSError, DataError):
        if (won := find_prepared(out)) is not None:  # a concurrent preparation finished first
            return won
        raise


def _assemble_and_install(cfg, key, out, work, units, counts, tok, skipped) -> PreparedData:
    tmp = work / f"out.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index = assemble(
            work,
            tmp,
            units,
            counts,
            vocab_size=tok.vocab_size,
            fingerprint=tok.fingerprint,
            shard_tokens=cfg.shard_tokens,
            val_fraction=cfg.val_fraction,
        )
        tok.save(tmp)
        split_total = {
            s: (sum(e["tokens"] for e in index[s]), sum(e["documents"] for e in index[s]))
            for s in ("train", "val")
        }
        meta = {
            "name": out.name,
            "key": key,
            "index_format": PREP_FORMAT,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "corpus_bytes": sum(c["text_bytes"] for c in counts.values()),
            "documents": sum(c["train_documents"] + c["val_documents"] for c in counts.values()),
            "train_tokens": split_total["train"][0],
            "val_tokens": split_total["val"][0],
            "train_documents": split_total["train"][1],
            "val_documents": split_total["val"][1],
            "skipped_records": skipped,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = find_prepared(out, reused=False)
    if data is None:
        raise DataError(f"{out}: prepared data failed validation right after writing")
    shutil.rmtree(work, ignore_errors=True)
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
            if find_prepared(out) is not None:
                return  # a concurrent process won the race
            stale = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.stale"
            try:
                os.rename(out, stale)  # move the broken directory aside, then retry
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"{out}: could not install the prepared data (directory keeps changing)")


def prepare_sources(cfg: DataConfig, *, progress: bool = True) -> list[PreparedData]:
    """Every source's prepared data: ``data.prepared``, or each mixture source's, or the corpus's."""
    if cfg.prepared:
        return [load_prepared(cfg.prepared)]
    if not cfg.sources:
        return [prepare_data(cfg, progress=progress)]
    out = []
    for s in cfg.sources:
        if s.prepared:
            out.append(load_prepared(s.prepared))
        else:
            one = replace(cfg, corpus=s.corpus, text_field=s.text_field or cfg.text_field, sources=[])
            out.append(prepare_data(one, progress=progress))
    fingerprints = {p.tokenizer_fingerprint for p in out}
    if len(fingerprints) > 1:
        raise DataError(
            "data.sources: the sources were tokenized differently ("
            + ", ".join(f"{p.dir}: {p.tokenizer_fingerprint}" for p in out)
            + "); prepare them with one tokenizer"
        )
    return out


# ----------------------------------------------------------------------------------------------
# The verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizing processes (default data.workers; 0: one per core)",
    )


def run(args: argparse.Namespace) -> int:
    """The ``prepare-data`` verb: prepare (or find) every source's shards and say where they are."""
    cfg = load_config(args.config, args.overrides).data
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError(f"--workers: must be non-negative (got {args.workers})")
        cfg = replace(cfg, workers=args.workers)
    for prepared in prepare_sources(cfg):
        m = prepared.meta
        print(
            f"prepared {prepared.dir} (vocab {prepared.vocab_size}; {m.get('documents', 0):,} documents, "
            f"{m.get('train_tokens', 0):,} train + {m.get('val_tokens', 0):,} val tokens in "
            f"{len(prepared.train_shards)} + {len(prepared.val_shards)} shards)"
        )
    return 0
