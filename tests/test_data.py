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
    read_corpus,
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
    assert np.array_equal(tok.encode_arrays([TEXT])[0], np.array(ids, dtype=np.uint16))


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


def test_bpe_rejects_vocab_beyond_uint16():
    with pytest.raises(ValueError, match="65536"):
        BPETokenizer.train(["abc"], vocab_size=70_000)


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


def test_user_corpus_directory_is_recursive_sorted_and_filtered(corpus_dir):
    assert [rel for rel, _ in corpus_files(str(corpus_dir))] == ["a.txt", "sub/b.md", "sub/c.py"]
    assert [rel for rel, _ in corpus_files(str(corpus_dir / "a.txt"))] == ["a.txt"]
    with pytest.raises(DataError, match="not found"):
        corpus_files(str(corpus_dir / "nope"))


def test_corpus_cap_is_respected_on_a_character_boundary(corpus_dir):
    files = corpus_files(str(corpus_dir))
    full = "".join(read_corpus(files))
    for cap in (1000, 3013, 10**9):
        text = "".join(read_corpus(files, cap))
        assert len(text.encode("utf-8")) <= cap
        assert full.startswith(text)
    assert "# file: sub/b.md" in full


def test_prepare_data_writes_shards_and_is_idempotent(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "data", val_fraction=0.1)
    first = prepare_data(cfg, progress=False)
    assert not first.reused and first.dir.parent == tmp_path / "data"
    train, val = first.train_shard(), first.val_shard()
    meta = json.loads((first.dir / "meta.json").read_text())
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert len(val) == round(0.1 * (len(train) + len(val)))
    assert first.vocab_size == 256 and first.tokenizer_fingerprint == ByteTokenizer().fingerprint
    # the val split is the end of the token stream: train + val is the whole corpus, in order
    text = "".join(read_corpus(corpus_files(str(corpus_dir)), cfg.max_corpus_bytes))
    stream = np.concatenate([train.tokens, val.tokens])
    assert first.tokenizer().decode(stream) == text

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
    assert set(tree_bytes(a.dir)) == {"train.bin", "val.bin", "tokenizer.json", "meta.json"}
    tok = a.tokenizer()
    assert isinstance(tok, BPETokenizer) and tok.fingerprint == a.tokenizer_fingerprint
    assert a.vocab_size == tok.vocab_size <= 400
    assert a.train_shard().tokens.max() < a.vocab_size


def test_settings_and_corpus_changes_select_a_new_directory(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    base = prepare_data(cfg, progress=False).dir
    assert prepare_data(replace(cfg, val_fraction=0.3), progress=False).dir != base
    assert prepare_data(replace(cfg, max_corpus_bytes=2000), progress=False).dir != base
    (corpus_dir / "a.txt").write_text(TEXT)  # edited corpus: never reuse stale shards
    assert prepare_data(cfg, progress=False).dir != base


def test_a_broken_prepared_directory_is_rebuilt(corpus_dir, tmp_path):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    first = prepare_data(cfg, progress=False)
    good = tree_bytes(first.dir)
    _corrupt(first.train_path, "truncated")
    again = prepare_data(cfg, progress=False)
    assert not again.reused and again.dir == first.dir and tree_bytes(again.dir) == good


def test_losing_an_install_race_keeps_the_winners_valid_directory(corpus_dir, tmp_path, monkeypatch):
    cfg = data_cfg(corpus_dir, tmp_path / "d")
    winner = prepare_data(cfg, progress=False)
    good = tree_bytes(winner.dir)
    import mupfast.data.prepare as data_mod

    calls = []
    real = data_mod._load_prepared
    # the fast path misses (as if the other process had not finished yet), the install then collides
    monkeypatch.setattr(
        data_mod,
        "_load_prepared",
        lambda d, reused=True: calls.append(d) or (None if len(calls) == 1 else real(d, reused)),
    )
    loser = prepare_data(cfg, progress=False)
    assert loser.dir == winner.dir and tree_bytes(loser.dir) == good
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [winner.dir.name]


def test_too_small_or_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(DataError, match="only 1 tokens, too few"):
        prepare_data(data_cfg(tmp_path / "one.txt", tmp_path / "d", max_corpus_bytes=1), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files found"):
        prepare_data(data_cfg(tmp_path / "empty", tmp_path / "d"), progress=False)


def test_stdlib_corpus_is_deterministic_and_excludes_tests(tmp_path):
    files = corpus_files("stdlib")
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(
        part in {"test", "tests", "idlelib", "lib2to3", "site-packages"}
        for r in rels
        for part in r.split("/")
    )
    assert read_corpus(files, 200_000) == read_corpus(corpus_files("stdlib"), 200_000)
    cfg = DataConfig(corpus="stdlib", dir=str(tmp_path / "a"), max_corpus_bytes=200_000)
    a = prepare_data(cfg, progress=False)
    b = prepare_data(replace(cfg, dir=str(tmp_path / "b")), progress=False)
    assert a.dir.name.startswith("stdlib-byte-") and tree_bytes(a.dir) == tree_bytes(b.dir)
    assert 190_000 < len(a.train_shard()) + len(a.val_shard()) <= 200_000


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
    a, b = sampler(shard), sampler(TokenShard(shard.path))
    for step, micro in [(0, 0), (5, 0), (5, 3), (10_000, 1)]:
        xa, ya = a.batch(step, micro)
        xb, yb = b.batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a.batch(9)[0], a.batch(9, micro_step=0)[0])


def test_sampler_differs_across_steps_micro_steps_ranks_and_seeds(shard):
    ref = sampler(shard).batch(4, 1)[0]
    others = [
        sampler(shard).batch(5, 1),
        sampler(shard).batch(4, 0),
        sampler(shard, rank=1, world_size=2).batch(4, 1),
        sampler(shard, seed=8).batch(4, 1),
    ]
    for x, _ in others:
        assert not torch.equal(ref, x)


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
    s = BatchSampler(data.train_shard(), seq_len=16, micro_batch_size=2, seed=0)
    x, y = s.batch(0)
    text = data.tokenizer().decode(x[0].tolist())
    assert text in data.tokenizer().decode(data.train_shard().tokens)
    assert os.path.samefile(data.train_path, data.dir / "train.bin")
