"""Prompt/completion JSON Lines: examples packed like documents, the loss on completion tokens only.

Each record ``{"prompt": …, "completion": …}`` (field names: finetune.prompt_field /
completion_field) becomes ``[BOS] + prompt + completion + EOS`` in the token stream, with a parallel
byte per token saying whether it belongs to the prompt. :func:`prepare_finetune_data` writes them in
the prepared-data layout (``index.json``, ``meta.json``, the tokenizer, ``train-00000.bin``/
``val-00000.bin`` token shards) plus a ``.prompt`` file beside each shard, in a directory named by a
hash of the files, the tokenizer and the fields (found again, not redone), and points
``data.prepared`` at it. The trainer's :class:`~mupfast.data.BatchSampler` draws windows from it as
from any corpus (random or epoch, a pure function of the step); :func:`completion_only` makes each
window carry its prompt flags and turns the targets that are prompt tokens into −100, the ignore
index of ``model(tokens, targets)``: a window crossing an example boundary learns the completion
and EOS of one example, never the next one's prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from mupfast.config import Config
from mupfast.data.corpus import corpus_files, corpus_listing
from mupfast.data.sampler import ShardSet
from mupfast.data.shards import write_shard
from mupfast.data.tokenizer import load_tokenizer
from mupfast.data.units import is_val
from mupfast.errors import DataError

FLAG_SHIFT = 32  # a window's int64 values: token id | is_prompt << 32
FORMAT_VERSION = 1


def _records(path: Path):
    """(line number, record) of a JSON Lines file (also .gz / .zst)."""
    import gzip

    opener = open
    if path.name.endswith(".gz"):
        opener = gzip.open
    elif path.name.endswith(".zst"):
        import zstandard

        def opener(p, mode):
            return zstandard.open(p, "rb")

    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None


def is_prompt_completion(cfg: Config) -> bool:
    """Whether data.corpus is prompt/completion records (finetune.format, or auto-detected)."""
    f = cfg.finetune
    if f.method == "none" or f.format == "text" or cfg.data.prepared or cfg.data.sources:
        return False
    if f.format == "prompt_completion":
        return True
    if cfg.data.corpus == "stdlib":
        return False
    files = corpus_files(cfg.data.corpus)
    if not files or files[0].format != "jsonl":
        return False
    for _, record in _records(files[0].path):
        return isinstance(record, dict) and f.prompt_field in record and f.completion_field in record
    return False


def _field(record, key: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise DataError(f"{where}: no string field {key!r} (a prompt/completion record needs both fields)")
    return record[key]


def prepare_finetune_data(cfg: Config) -> Config:
    """``cfg`` unchanged for plain corpora; for prompt/completion records, with data.prepared set to
    their prepared directory (made now, or found from an earlier run)."""
    if not is_prompt_completion(cfg):
        return cfg
    f, d = cfg.finetune, cfg.data
    files = corpus_files(d.corpus)
    if any(x.format != "jsonl" for x in files):
        bad = next(x for x in files if x.format != "jsonl")
        raise DataError(f"{bad.path}: prompt/completion data must be JSON Lines")
    tok = load_tokenizer(d.tokenizer, eos_token=d.eos_token)
    key = {
        "format": FORMAT_VERSION,
        "files": corpus_listing(files),
        "tokenizer": tok.fingerprint,
        "fields": [f.prompt_field, f.completion_field],
        "val_fraction": d.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(d.dir) / f"prompt-completion-{digest}"
    if not (out / "index.json").is_file():
        _prepare(files, tok, f, d.val_fraction, out, key)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, prepared=str(out)))


def _prepare(files, tok, f, val_fraction: float, out: Path, key: dict) -> None:
    """Tokenize every record into the two splits; written aside and renamed into place (atomic, so
    ranks preparing at once leave one complete directory)."""
    split: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    examples = 0
    for cf in files:
        for lineno, record in _records(cf.path):
            where = f"{cf.path}:{lineno}"
            prompt = tok.encode_prompt(_field(record, f.prompt_field, where))
            completion = tok.encode(_field(record, f.completion_field, where)) + [tok.eos_id]
            ids, flags = split[is_val(cf.rel, lineno, val_fraction)]
            ids.append(np.asarray(prompt + completion, dtype=np.int64))
            flags.append(np.r_[np.ones(len(prompt), np.uint8), np.zeros(len(completion), np.uint8)])
            examples += 1
    if examples < 2:
        raise DataError(f"{files[0].path}: {examples} prompt/completion record(s); need at least two")
    if not split[True][0]:  # a tiny set: hold out its last example
        for part in (0, 1):
            split[True][part].append(split[False][part].pop())
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {}
    for held_out, name in ((False, "train"), (True, "val")):
        ids, flags = (np.concatenate(x) for x in split[held_out])
        write_shard(tmp / f"{name}-00000.bin", ids, tok.vocab_size, tok.fingerprint)
        flags.tofile(tmp / f"{name}-00000.prompt")
        index[name] = [{"file": f"{name}-00000.bin", "tokens": int(len(ids))}]
    tok.save(tmp)
    meta = {
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
        "tokenizer_fingerprint": tok.fingerprint,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "index_format": 2,
        "documents": examples,
        "prompt_completion": True,
        "key": key,
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.rename(tmp, out)
    except OSError:  # another rank got there first: its directory is the same
        shutil.rmtree(tmp, ignore_errors=True)


def prompt_file(shard_path: Path) -> Path:
    return Path(shard_path).with_suffix(".prompt")


class PromptFlaggedShards(ShardSet):
    """A ShardSet whose windows carry each token's prompt flag in bit 32 of the int64 values."""

    def __init__(self, shards):
        super().__init__(shards)
        self.flags = []
        for s in self.shards:
            flags = np.memmap(prompt_file(s.path), dtype=np.uint8, mode="r")
            if len(flags) != len(s):
                raise DataError(f"{prompt_file(s.path)}: {len(flags)} flags for {len(s)} tokens")
            self.flags.append(flags)

    def windows(self, index: np.ndarray, seq_len: int, *, epoch: bool = False) -> np.ndarray:
        shard, offset = self.locate(index, seq_len, epoch=epoch)
        out = np.empty((len(shard), seq_len + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            ids = self.shards[s].tokens[o : o + seq_len + 1].astype(np.int64)
            out[i] = ids | (self.flags[s][o : o + seq_len + 1].astype(np.int64) << FLAG_SHIFT)
        return out


def _unflag(batch):
    x, y = batch
    low = (1 << FLAG_SHIFT) - 1
    return x & low, (y & low).masked_fill((y >> FLAG_SHIFT) != 0, -100)


class CompletionOnly:
    """A BatchSampler whose targets are −100 wherever the target token is a prompt token."""

    def __init__(self, inner):
        self.inner = inner
        inner.sources = [PromptFlaggedShards(s.shards) for s in inner.sources]

    def batch(self, step: int, micro_step: int = 0):
        return _unflag(self.inner.batch(step, micro_step))

    def eval_batches(self, n: int):
        for b in self.inner.eval_batches(n):
            yield _unflag(b)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def completion_only(sampler):
    """``sampler`` itself, or wrapped in :class:`CompletionOnly` when its shards carry prompt flags."""
    shards = [s.path for src in sampler.sources for s in src.shards]
    if not shards or not all(prompt_file(p).is_file() for p in shards):
        return sampler
    return CompletionOnly(sampler)
