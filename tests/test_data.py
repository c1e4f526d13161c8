import json
import os
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mupfast.config import DataConfig
from mupfast.data import (
    HEADER_BYTES,
    BatchSampler,
    DataError,
    TokenShard,
    corpus_files,
    prepare_data,
    read_documents,
    write_shard,
)
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Naïve café, Ærøskøbing, 東京, emoji 🦊.\n"
    "def f(x):\n    return x * 2  # double it\n\n"
)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXT * 40)
    (d / "sub" / "b.md").write_text("# Title\n\n" + "Some *markdown* text, über alles. " * 60)
    (d / "sub" / "c.py").write_text("import os\n\nprint(os.getcwd())\n" * 30)
    (d / "ignored.bin").write_bytes(b"\xff\x00" * 50)
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text("hidden")
    return d


def data_cfg(corpus, out, **kw):
    return DataConfig(corpus=str(corpus), dir=str(out), **kw)


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
    assert tok.fingerprint == ByteTokenizer().fingerprint and len(tok.fingerprint) <= 32
    (doc,) = tok.encode_documents([TEXT])  # a document ends with the byte tokenizer's EOS, 0
    assert doc.dtype == np.uint16 and np.array_equal(doc, np.array([*ids, 0], dtype=np.uint16))


def test_bpe_trains_round_trips_respects_vocab_and_reloads_with_the_same_fingerprint(tmp_path):
    tok = BPETokenizer.train([TEXT * 20, "hello world " * 50], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    for s in (TEXT, "  leading spaces", "unseen: ğüşıöç ☃"):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert max(ids) < tok.vocab_size
    assert len(tok.encode(TEXT)) < len(TEXT.encode("utf-8"))  # merges were learned
    tok.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert again.fingerprint == tok.fingerprint and again.encode(TEXT) == tok.encode(TEXT)
    assert BPETokenizer.train([TEXT * 20, "hello world " * 50], vocab_size=300).fingerprint == tok.fingerprint
    assert BPETokenizer.train([TEXT * 20], vocab_size=280).fingerprint != tok.fingerprint


def test_bpe_needs_room_beyond_the_bytes_and_its_eos():
    # (ids are stored as uint32 above 65,536 now, so the old uint16 ceiling is gone)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["abc"], vocab_size=257)


# ---------------------------------------------------------------- shards


def test_shard_round_trips_header_and_tokens(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=5000)
    write_shard(tmp_path / "s.bin", tokens, 1000, "abc123")
    shard = TokenShard(tmp_path / "s.bin")
    assert (shard.vocab_size, shard.fingerprint, len(shard)) == (1000, "abc123", 5000)
    assert np.array_equal(shard.tokens, tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:8] == b"MUPFTOK\0" and len(raw) == HEADER_BYTES + 2 * 5000
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], "<u2"), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_empty_shard_is_valid(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), 256, "fp")
    assert len(TokenShard(tmp_path / "e.bin")) == 0


def test_write_shard_rejects_ids_outside_the_vocab(tmp_path):
    with pytest.raises(DataError, match="outside vocab 10"):
        write_shard(tmp_path / "s.bin", np.array([1, 10]), 10, "fp")
    assert not (tmp_path / "s.bin").exists()


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "missing":
        path.unlink()
    elif how == "bad magic":
        raw[:8] = b"NOTMUPF\0"
    elif how == "version":
        raw[8:12] = struct.pack("<I", 7)
    elif how == "truncated":
        raw = raw[:-3]
    elif how == "short header":
        raw = raw[:20]
    elif how == "out of range":
        raw[HEADER_BYTES + 2 * 5 : HEADER_BYTES + 2 * 6] = struct.pack("<H", 300)
    if how != "missing":
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how, match",
    [
        ("missing", "not found"),
        ("bad magic", "not a mupfast token shard"),
        ("version", "unsupported shard version 7"),
        ("truncated", "truncated shard"),
        ("short header", "truncated shard"),
        ("out of range", "token id 300 .*position 5.* vocab size 256"),
    ],
)
def test_each_corruption_raises_a_one_line_data_error_naming_the_file(tmp_path, how, match):
    path = tmp_path / "broken-shard.bin"
    write_shard(path, np.arange(100) % 256, 256, "fp")
    _corrupt(path, how)
    with pytest.raises(DataError, match=match) as info:
        TokenShard(path)
    msg = str(info.value)
    assert "broken-shard.bin" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- corpus and prepare_data


def read_corpus(corpus, cap: int = 0) -> str:
    """The corpus's documents in order, as preparation reads them, cut to ``cap`` UTF-8 bytes."""
    text = "".join(doc for f in corpus_files(corpus) for _, doc in read_documents(f))
    return text.encode("utf-8")[:cap].decode("utf-8", errors="ignore") if cap else text


def documents_of(data) -> list[str]:
    """Every document of a prepared directory (train shards then val shards), split at EOS."""
    tok = data.tokenizer()
    ids = np.concatenate([s.tokens for split in ("train", "val") for s in data.shards(split)])
    return tok.decode(ids.tolist()).split(tok.eos_token)[:-1]


def test_user_corpus_directory_is_recursive_sorted_and_filtered(corpus_dir):
    assert [f.rel for f in corpus_files(str(corpus_dir))] == ["a.txt", "sub/b.md", "sub/c.py"]
    assert [f.rel for f in corpus_files(str(corpus_dir / "a.txt"))] == ["a.txt"]
    with pytest.raises(DataError, match="does not exist"):
        corpus_files(str(corpus_dir / "nope"))


def test_corpus_cap_is_respected_on_a_character_boundary(corpus_dir, tmp_path):
    full = read_corpus(str(corpus_dir))
    assert "# file: sub/b.md" in full
    for cap in (1000, 3013):
        data = prepare_data(data_cfg(corpus_dir, tmp_path / f"d{cap}", max_corpus_bytes=cap), progress=False)
        text = "".join(documents_of(data))
        assert len(text.encode("utf-8")) <= cap and full.startswith(text) and data.meta["corpus_bytes"] <= cap
        assert len(text.encode("utf-8")) > cap - 4  # cut inside a character at most


def test_prepare_data_writes_shards_and_is_idempotent(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "data", val_fraction=0.1)
    first = prepare_data(cfg, progress=False)
    assert not first.reused and first.dir.parent == tmp_path / "data"
    (train,), (val,) = first.shards("train"), first.shards("val")
    meta = json.loads((first.dir / "meta.json").read_text())
    index = json.loads((first.dir / "index.json").read_text())
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert [e["tokens"] for e in index["train"]] == [len(train)] and index["val"][0]["tokens"] == len(val)
    # three documents are too few for the hash split: the last tenth of the stream is held out
    assert len(val) == round(0.1 * (len(train) + len(val)))
    assert first.vocab_size == 256 and first.tokenizer_fingerprint == ByteTokenizer().fingerprint
    # train + val is the whole corpus, in order, each document ended by EOS (0)
    stream = np.concatenate([train.tokens, val.tokens])
    assert first.tokenizer().decode(stream[stream != 0]) == read_corpus(str(corpus_dir))
    assert int((stream == 0).sum()) == 3 and stream[-1] == 0

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.dir.iterdir()}
    second = prepare_data(cfg, progress=False)
    assert second.reused and second.dir == first.dir
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in second.dir.iterdir()} == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == [first.dir.name]  # no temp dirs left


def test_prepare_data_is_deterministic_across_fresh_directories(corpus_dir, tmp_path):
    a = prepare_data(
        data_cfg(corpus_dir, tmp_path / "a", tokenizer="bpe", bpe_vocab_size=400), progress=False
    )
    b = prepare_data(
        data_cfg(corpus_dir, tmp_path / "b", tokenizer="bpe", bpe_vocab_size=400), progress=False
    )
    assert a.dir.name == b.dir.name
    assert tree_bytes(a.dir) == tree_bytes(b.dir)
    assert set(tree_bytes(a.dir)) == {
        "train-00000.bin",
        "val-00000.bin",
        "index.json",
        "tokenizer.json",
        "mupfast_tokenizer.json",
        "meta.json",
    }
    tok = a.tokenizer()
    assert isinstance(tok, BPETokenizer) and tok.fingerprint == a.tokenizer_fingerprint
    assert a.vocab_size == tok.vocab_size <= 400
    assert a.shards("train")[0].tokens.max() < a.vocab_size
    assert documents_of(a) == [doc for f in corpus_files(str(corpus_dir)) for _, doc in read_documents(f)]


def test_settings_and_corpus_changes_select_a_new_directory(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    base = prepare_data(cfg, progress=False).dir
    assert prepare_data(replace(cfg, val_fraction=0.3), progress=False).dir != base
    assert prepare_data(replace(cfg, max_corpus_bytes=2000), progress=False).dir != base
    assert prepare_data(replace(cfg, shard_tokens=1000), progress=False).dir != base
    assert prepare_data(replace(cfg, workers=2), progress=False).dir == base  # not a setting of the result
    (corpus_dir / "a.txt").write_text(TEXT)  # edited corpus: never reuse stale shards
    assert prepare_data(cfg, progress=False).dir != base


def test_a_broken_prepared_directory_is_rebuilt(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    first = prepare_data(cfg, progress=False)
    good = tree_bytes(first.dir)
    _corrupt(first.train_shards[0], "truncated")
    again = prepare_data(cfg, progress=False)
    assert not again.reused and again.dir == first.dir and tree_bytes(again.dir) == good


def test_losing_an_install_race_keeps_the_winners_valid_directory(corpus_dir, tmp_path, monkeypatch):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    winner = prepare_data(cfg, progress=False)
    good = tree_bytes(winner.dir)
    import mupfast.data.prepare as data_mod

    calls = []
    real = data_mod.find_prepared
    # the fast path misses (as if the other process had not finished yet), the install then collides
    monkeypatch.setattr(
        data_mod,
        "find_prepared",
        lambda d, reused=True: calls.append(d) or (None if len(calls) == 1 else real(d, reused)),
    )
    loser = prepare_data(cfg, progress=False)
    assert loser.dir == winner.dir and tree_bytes(loser.dir) == good
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [winner.dir.name]


def test_too_small_or_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n')  # one empty document: its EOS alone
    with pytest.raises(DataError, match="only 1 tokens, too few"):
        prepare_data(data_cfg(tmp_path / "one.jsonl", tmp_path / "d"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no supported file under"):
        prepare_data(data_cfg(tmp_path / "empty", tmp_path / "d"), progress=False)
    with pytest.raises(DataError, match="data.corpus: path does not exist: /no/such/corpus"):
        prepare_data(data_cfg("/no/such/corpus", tmp_path / "d"), progress=False)


def test_stdlib_corpus_is_deterministic_and_excludes_tests(tmp_path):
    files = corpus_files("stdlib")
    rels = [f.rel for f in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(
        part in {"test", "tests", "idlelib", "lib2to3", "site-packages"}
        for r in rels
        for part in r.split("/")
    )
    assert read_corpus("stdlib", 200_000) == read_corpus("stdlib", 200_000)
    cfg = DataConfig(corpus="stdlib", dir=str(tmp_path / "a"), max_corpus_bytes=200_000)
    a = prepare_data(cfg, progress=False)
    b = prepare_data(replace(cfg, dir=str(tmp_path / "b"), workers=2), progress=False)
    assert a.dir.name.startswith("stdlib-byte-") and tree_bytes(a.dir) == tree_bytes(b.dir)
    tokens = a.meta["train_tokens"] + a.meta["val_tokens"]
    assert 190_000 < tokens - a.meta["documents"] <= 200_000  # the text, and an EOS per document


# ---------------------------------------------------------------- sampler


@pytest.fixture
def shard(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 500, size=20_000)
    write_shard(tmp_path / "train.bin", tokens, 500, "fp")
    return TokenShard(tmp_path / "train.bin")


def sampler(shard, **kw):
    args = {"seq_len": 32, "micro_batch_size": 4, "seed": 7} | kw
    return BatchSampler(shard, **args)


def test_sampler_batches_are_shifted_windows_within_vocab(shard):
    x, y = sampler(shard).batch(3)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(torch.maximum(x, y).max()) < 500
    tokens = torch.from_numpy(shard.tokens.astype(np.int64))
    for row_x, row_y in zip(x, y):  # each row is a contiguous window of the shard
        window = torch.cat([row_x, row_y[-1:]])
        starts = [i for i in range(len(tokens) - 32) if torch.equal(tokens[i : i + 33], window)]
        assert starts


def test_sampler_is_a_pure_function_of_the_key(shard, tmp_path):
    a, b = sampler(shard, micro_batches_per_step=4), sampler(TokenShard(shard.path), micro_batches_per_step=4)
    for step, micro in [(0, 0), (5, 0), (5, 3), (10_000, 1)]:
        xa, ya = a.batch(step, micro)
        xb, yb = b.batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a.batch(9)[0], a.batch(9, micro_step=0)[0])
    with pytest.raises(ValueError, match="micro"):  # a micro-batch the step does not have
        a.batch(0, 4)


def test_sampler_differs_across_steps_micro_steps_ranks_and_seeds(shard):
    # The trainer numbers micro-batches globally (micro_step × world + rank), so rank 1 of 2 reads
    # global micro-batch 1 where rank 0 reads 0: ranks differ through the index, not a rank key.
    four = dict(micro_batches_per_step=4)
    ref = sampler(shard, **four).batch(4, 1)[0]
    others = [
        sampler(shard, **four).batch(5, 1),
        sampler(shard, **four).batch(4, 0),
        sampler(shard, **four).batch(4, 0 * 2 + 1),  # rank 1 of 2 at micro step 0 …
        sampler(shard, **four, seed=8).batch(4, 1),
    ]
    for x, _ in others[:2] + others[3:]:
        assert not torch.equal(ref, x)
    assert torch.equal(ref, others[2][0])  # … is global micro-batch 1, whatever the split


def test_eval_batches_are_stable_and_independent_of_the_training_seed(shard):
    s = sampler(shard)
    first = list(s.eval_batches(3))
    assert len(first) == 3
    again = list(s.eval_batches(3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other_seed = list(sampler(shard, seed=99).eval_batches(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, other_seed))
    assert not any(torch.equal(first[0][0], s.batch(k)[0]) for k in range(3))
    # two ranks together see the first 2n eval batches of a single rank
    r0 = list(sampler(shard, rank=0, world_size=2).eval_batches(2))
    r1 = list(sampler(shard, rank=1, world_size=2).eval_batches(2))
    single = list(s.eval_batches(4))
    assert [torch.equal(a[0], b[0]) for a, b in zip([r0[0], r1[0], r0[1], r1[1]], single)] == [True] * 4


def test_sampler_rejects_a_shard_shorter_than_one_window(tmp_path):
    write_shard(tmp_path / "tiny.bin", np.arange(32), 256, "fp")
    tiny = TokenShard(tmp_path / "tiny.bin")
    with pytest.raises(DataError, match=r"tiny\.bin: 32 tokens, fewer than seq_len \+ 1 = 33"):
        BatchSampler(tiny, seq_len=32, micro_batch_size=2, seed=0)
    x, _ = BatchSampler(tiny, seq_len=31, micro_batch_size=2, seed=0).batch(0)
    assert torch.equal(x[0], torch.arange(31))  # the only window


def test_sampler_argument_errors(shard):
    with pytest.raises(ValueError, match="rank 2"):
        sampler(shard, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-negative"):
        sampler(shard).batch(-1)


def test_prepared_data_feeds_the_sampler(corpus_dir, tmp_path):
    data = prepare_data(data_cfg(corpus_dir, tmp_path / "d"), progress=False)
    s = BatchSampler(data.train_set(), seq_len=16, micro_batch_size=2, seed=0)
    x, y = s.batch(0)
    text = data.tokenizer().decode(x[0].tolist())
    assert text in data.tokenizer().decode(data.shards("train")[0].tokens)
    assert os.path.samefile(data.train_shards[0], data.dir / "train-00000.bin")
