"""Preparation of pretraining data as users have it: JSON Lines (plain, gzip, zstd) and Parquet
corpora with an existing tokenizer.json, many shards, results independent of the worker count,
resumable after a kill, bad records named or counted; and the trainer on top of it: a mixture of
two sources, epoch sampling that resumes bitwise, and shards of the first format still training."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import mupfast.data.prepare as prepare_module
from mupfast.config import DataConfig
from mupfast.data import BPETokenizer, TokenShard, prepare_data
from mupfast.data.shards import HEADER_BYTES, MAGIC
from mupfast.errors import ConfigError, DataError
from mupfast.rundir import read_metrics
from tests.helpers import assert_resume_is_bitwise, tiny_config

EXTRA = 70_000  # added tokens: the vocabulary passes 65,536, so ids are stored as uint32


def document(i: int) -> str:
    """A document with what JSON escapes (quotes, newlines, backslashes, unicode) and, now and then,
    one of the added tokens, so that ids above 65,535 really occur."""
    extra = f" <extra_{69_990 + i % 7}>" if i % 5 == 0 else ""
    return f'doc {i}: "quoted" {{braces}} \\ back\\slash\nnaïve café 東京 🦊 ' + "word " * (i % 13) + extra


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory):
    """A byte-level BPE trained here, plus 70,000 added tokens: a tokenizer.json of vocabulary > 65,536."""
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    BPETokenizer.train((document(i) for i in range(400)), 600).save(d / "tokenizer.json")
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    hf.add_tokens([f"<extra_{k}>" for k in range(EXTRA)])
    hf.save(str(d / "tokenizer.json"))  # an ordinary tokenizer directory, as a user has it
    return d


def write_corpus(root, n: int = 600) -> list[str]:
    """n documents over four files: plain, gzip and zstd JSON Lines, and Parquet (3 row groups)."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [document(i) for i in range(n)]
    quarter = n // 4
    parts = [texts[k * quarter : (k + 1) * quarter] for k in range(4)]

    def jsonl(docs):
        return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)).encode()

    (root / "a.jsonl").write_bytes(jsonl(parts[0]))
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(parts[1])))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(parts[2])))
    pq.write_table(
        pa.table({"text": parts[3], "id": list(range(quarter))}), root / "d.parquet", row_group_size=60
    )
    return [t for p in parts for t in p]


def data_cfg(corpus, out, tokenizer, **kw) -> DataConfig:
    return DataConfig(corpus=str(corpus), tokenizer=str(tokenizer), dir=str(out), **kw)


def tree_bytes(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_every_document_decodes_back_exactly_from_uint32_shards(tmp_path, big_vocab_tokenizer):
    texts = write_corpus(tmp_path / "corpus")
    data = prepare_data(
        data_cfg(
            tmp_path / "corpus", tmp_path / "d", big_vocab_tokenizer, shard_tokens=3000, val_fraction=0.1
        ),
        progress=False,
    )
    tok = data.tokenizer()
    assert data.vocab_size == tok.vocab_size > 65_536 and tok.eos_token == "<|endoftext|>"
    assert len(data.train_shards) > 3 and data.val_shards  # many shards, and a hash-held-out split
    shards = data.shards("train") + data.shards("val")
    assert all(s.tokens.dtype == np.dtype("<u4") for s in shards)
    ids = np.concatenate([s.tokens for s in shards])
    assert ids.max() >= 65_536  # the added tokens' ids are really stored
    # documents end with EOS: splitting every shard at EOS gives each document exactly once
    decoded = []
    for s in shards:
        ends = np.flatnonzero(s.tokens == tok.eos_id)
        assert ends[-1] == len(s) - 1  # a shard ends at a document boundary
        decoded += [tok.decode(d.tolist()) for d in np.split(s.tokens, ends + 1)[:-1]]
        decoded[-len(ends) :] = [d.removesuffix(tok.eos_token) for d in decoded[-len(ends) :]]
    assert sorted(decoded) == sorted(texts)  # no JSON syntax, escapes or field names got in
    meta = data.meta
    assert meta["documents"] == len(texts) == meta["train_documents"] + meta["val_documents"]
    assert 0 < meta["val_documents"] < 0.25 * len(texts)
    index = json.loads((data.dir / "index.json").read_text())
    assert [e["file"] for e in index["train"]] == [p.name for p in data.train_shards]
    assert sum(e["tokens"] for e in index["train"]) == meta["train_tokens"]
    assert all(e["tokens"] >= 3000 for e in index["train"][:-1])  # cut at the first boundary past it


def test_the_shards_do_not_depend_on_the_worker_count(tmp_path, big_vocab_tokenizer):
    write_corpus(tmp_path / "corpus", n=200)
    made = [
        prepare_data(
            data_cfg(
                tmp_path / "corpus", tmp_path / f"w{w}", big_vocab_tokenizer, shard_tokens=3000, workers=w
            ),
            progress=False,
        )
        for w in (1, 2)
    ]
    assert made[0].dir.name == made[1].dir.name
    assert tree_bytes(made[0].dir) == tree_bytes(made[1].dir)


def test_a_killed_preparation_continues_to_the_same_shards(tmp_path, big_vocab_tokenizer, monkeypatch):
    write_corpus(tmp_path / "corpus", n=200)
    whole = prepare_data(
        data_cfg(tmp_path / "corpus", tmp_path / "whole", big_vocab_tokenizer, workers=1), progress=False
    )
    cfg = data_cfg(tmp_path / "corpus", tmp_path / "cut", big_vocab_tokenizer, workers=1)
    real, ran = prepare_module.tokenize_unit, []

    def die_after_two(unit, *args, **kw):
        if len(ran) == 2:
            raise KeyboardInterrupt  # as a kill would stop it, between two units
        ran.append(unit.index)
        return real(unit, *args, **kw)

    monkeypatch.setattr(prepare_module, "tokenize_unit", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False)
    partial = next((tmp_path / "cut").glob(".*.partial"))
    assert sorted(p.name for p in partial.glob("u*.json")) == ["u000000.json", "u000001.json"]
    again: list[int] = []
    monkeypatch.setattr(
        prepare_module, "tokenize_unit", lambda unit, *a, **k: again.append(unit.index) or real(unit, *a, **k)
    )
    resumed = prepare_data(cfg, progress=False)
    assert again == [2, 3]  # only the units the kill left undone
    assert tree_bytes(resumed.dir) == tree_bytes(whole.dir)
    assert not list((tmp_path / "cut").glob(".*.partial"))


GOOD = b'{"text": "fine one"}\n'
BAD = {
    "bad_json": b'{"text": "fine two"\n',
    "missing_field": b'{"body": "no text field"}\n',
    "not_string": b'{"text": 42}\n',
    "not_utf8": b'{"text": "caf\xe9"}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_a_bad_record_stops_preparation_naming_the_file_and_line(tmp_path, reason):
    (tmp_path / "bad.jsonl").write_bytes(GOOD + b"\n" + BAD[reason] + GOOD)  # the bad record is line 3
    with pytest.raises(DataError) as info:
        prepare_data(DataConfig(corpus=str(tmp_path / "bad.jsonl"), dir=str(tmp_path / "d")), progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'}:3: ") and "\n" not in msg


def test_skipped_bad_records_are_counted_in_meta_and_on_stderr(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_bytes(
        GOOD + b"".join(BAD[r] for r in sorted(BAD)) + b'{"text": "fine three"}\n'
    )
    cfg = DataConfig(corpus=str(tmp_path / "bad.jsonl"), dir=str(tmp_path / "d"), on_bad_record="skip")
    data = prepare_data(cfg, progress=False)
    expected = {"bad_json": 1, "missing_field": 1, "not_string": 1, "not_utf8": 1}
    assert data.meta["skipped_records"] == expected and data.meta["documents"] == 2
    assert "skipped 4 bad records" in capsys.readouterr().err
    tok = data.tokenizer()
    ids = np.concatenate([s.tokens for s in data.shards("train") + data.shards("val")])
    assert tok.decode(ids.tolist()) == "fine one\0fine three\0"  # the good records, each ended by EOS


def _write_v1_shard(path, tokens: np.ndarray, vocab: int, fingerprint: str) -> None:
    header = struct.pack("<8sIIQ32s", MAGIC, 1, vocab, tokens.size, fingerprint.encode()).ljust(
        HEADER_BYTES, b"\0"
    )
    path.write_bytes(header + tokens.astype("<u2").tobytes())


def test_a_prepared_directory_of_the_first_format_still_trains(tmp_path):
    """train.bin / val.bin (version-1 shards, uint16, no EOS) and meta.json, as mupfast wrote them before."""
    old = tmp_path / "old"
    old.mkdir()
    text = np.frombuffer(("def f(x):\n    return x + 1\n\n" * 400).encode(), dtype=np.uint8).astype(np.int64)
    _write_v1_shard(old / "train.bin", text[:-500], 256, "oldbytefingerprint")
    _write_v1_shard(old / "val.bin", text[-500:], 256, "oldbytefingerprint")
    meta = {"vocab_size": 256, "tokenizer": "byte", "tokenizer_fingerprint": "oldbytefingerprint"}
    meta |= {"train_tokens": len(text) - 500, "val_tokens": 500}
    (old / "meta.json").write_text(json.dumps(meta))
    assert TokenShard(old / "train.bin").version == 1
    from mupfast.train import train

    cfg = tiny_config(f"data.prepared={old}", "train.steps=3", "train.eval_every=0", tmp_path=tmp_path)
    result = train(cfg)
    assert result.steps == 3 and np.isfinite(result.val_losses[3])


def _mixture(tmp_path) -> list[str]:
    for name, line in (("code", "def f(x):\n    return x\n"), ("prose", "The cat sat on the mat. ")):
        d = tmp_path / name
        d.mkdir()
        for k in range(3):
            (d / f"{k}.txt").write_text(line * (200 + 50 * k))
    return [
        f"data.sources=[{{corpus: {tmp_path / 'code'}, weight: 3}}, {{corpus: {tmp_path / 'prose'}, weight: 1}}]",
        "train.log_every=1",
        "train.eval_every=0",
    ]


def test_a_two_source_mixture_trains_in_proportion_and_logs_tokens_per_source(tmp_path):
    from mupfast.train import train

    cfg = tiny_config(*_mixture(tmp_path), "train.steps=4", tmp_path=tmp_path)
    train(cfg)
    last = read_metrics(cfg.train.run_dir, "train")[-1]
    rows = 4 * cfg.train.micro_batch_size  # 4 steps × 4 rows: 3 of every 4 from code
    assert last["tokens/code"] == 3 / 4 * rows * cfg.train.seq_len
    assert last["tokens/prose"] == 1 / 4 * rows * cfg.train.seq_len


def test_epoch_sampling_over_a_mixture_resumes_bitwise(tmp_path, monkeypatch):
    overrides = [*_mixture(tmp_path), "data.sampling=epoch", "train.steps=6", "train.save_every=3"]
    assert_resume_is_bitwise(overrides, tmp_path, monkeypatch, steps=6, crash_step=3)


def test_a_run_on_an_existing_tokenizer_generates_and_exports_with_it(tmp_path, capsys):
    """tokenizer.json in, tokenizer.json out: the run keeps the user's tokenizer, generate encodes
    prompts with it, and the export loads in transformers with the same ids and EOS."""
    from transformers import PreTrainedTokenizerFast

    from mupfast.cli import main
    from mupfast.train import train

    user_tok = tmp_path / "user-tokenizer"
    user_tok.mkdir()
    BPETokenizer.train((document(i) for i in range(300)), 500).save(user_tok / "tokenizer.json")
    write_corpus(tmp_path / "corpus", n=200)
    common = [
        f"data.corpus={tmp_path / 'corpus'}",
        f"data.tokenizer={user_tok}",
        "train.steps=2",
        "train.eval_every=0",
    ]
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than the tokenizer's vocabulary"):
        train(tiny_config(*common, tmp_path=tmp_path / "small"))
    cfg = tiny_config(*common, "model.vocab_size=512", tmp_path=tmp_path)
    train(cfg)
    run = cfg.train.run_dir
    capsys.readouterr()  # what training printed
    assert main(["generate", "--run", run, "--prompt", "doc 3:", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("doc 3:")
    assert main(["export", "--run", run, "--out", str(tmp_path / "hf")]) == 0
    exported = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    ours = prepare_module.load_tokenizer(str(user_tok))
    assert exported.eos_token == "<|endoftext|>" == ours.eos_token
    assert exported.encode("naïve café 東京", add_special_tokens=False) == ours.encode("naïve café 東京")
