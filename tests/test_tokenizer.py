"""The tokenizer interface: byte, locally trained BPE and Hugging Face tokenizer.json files.

The HF tokenizers are built here with the ``tokenizers`` library (no downloads): a GPT-2-like
byte-level BPE, a Llama-like one whose post-processor prepends <s>, and a > 65,536-id WordLevel one.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mupfast.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    load_saved_tokenizer,
    load_tokenizer,
)
from mupfast.errors import ConfigError, DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def train(model, data):\n    for batch in data:\n        loss = model(batch)\n",
    "Grüße aus Köln! Ça va très bien, merci. Ελληνικά και русский текст. 日本語のテキスト。",
    "Tokenizers split text into pieces; byte-level ones never meet an unknown character. " * 4,
    "Numbers 0123456789, punctuation !?;:, emoji 🦊🐶 and tabs\tand newlines\n\n",
] * 8  # a few KB
TEXTS = ["hello world", "  leading spaces", "Grüße, 日本語 🦊!", "unseen: ğüşıöç ☃", ""]


def _byte_level_bpe(specials: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2-like: byte-level BPE, <|endoftext|> added after training, a ByteLevel post-processor
    (it adds no tokens), and a truncation setting in the file that must not cut documents."""
    tok = _byte_level_bpe([])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.enable_truncation(8)
    d = tmp_path_factory.mktemp("gpt2")
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama-like: <s> prepended by a TemplateProcessing post-processor; </s> named in tokenizer_config.json."""
    tok = _byte_level_bpe(["<unk>", "<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    d = tmp_path_factory.mktemp("llama")
    tok.save(str(d / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": True}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A WordLevel vocabulary of 70,000 words + [UNK] + <|endoftext|>: ids above uint16."""
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("big") / "tokenizer.json"
    tok.save(str(path))
    return path


def _check_documents(tok, texts):
    docs = tok.encode_documents(texts)
    assert len(docs) == len(texts)
    head = [] if tok.bos_id is None else [tok.bos_id]
    for doc, text in zip(docs, texts):
        assert doc.dtype == tok.token_dtype
        assert doc.tolist() == head + tok.encode(text) + [tok.eos_id]
    return docs


def _check_save_load(tok, directory):
    written = tok.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(written)
    again = load_saved_tokenizer(directory)
    assert (again.kind, again.fingerprint, again.eos_id, again.bos_id) == (
        tok.kind,
        tok.fingerprint,
        tok.eos_id,
        tok.bos_id,
    )
    assert again.vocab_size == tok.vocab_size and again.source == tok.source
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    return written


def _matches_transformers(tok, file, texts):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    return ref


# ---------------------------------------------------------------- byte


def test_byte_tokenizer_has_eos_0_and_round_trips(tmp_path):
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.kind == "byte"
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.token_dtype) == (256, 0, None, np.dtype("<u2"))
    for text in TEXTS:
        assert tok.encode(text) == list(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert tok.encode_prompt("hi") == [104, 105]
    docs = _check_documents(tok, TEXTS)
    assert all(d[-1] == 0 for d in docs)
    assert tok.fingerprint == ByteTokenizer().fingerprint and len(tok.fingerprint) <= 32
    assert tok.fingerprint != hashlib.sha256(b"mupfast-byte-tokenizer-v1").hexdigest()[:16]  # EOS changed ids
    assert _check_save_load(tok, tmp_path / "saved") == ["mupfast_tokenizer.json"]
    with pytest.raises(ConfigError, match="eos_token"):
        load_tokenizer("byte", eos_token="</s>")


# ---------------------------------------------------------------- locally trained BPE


def test_bpe_trains_from_a_generator_with_endoftext_as_eos(tmp_path):
    consumed = []

    def stream():
        for doc in CORPUS:
            consumed.append(doc)
            yield doc

    tok = BPETokenizer.train(stream(), vocab_size=300)
    assert len(consumed) == len(CORPUS)
    assert tok.kind == "bpe" and 257 < tok.vocab_size <= 300 and tok.token_dtype == np.dtype("<u2")
    assert tok.eos_id == tok.encode("<|endoftext|>")[0] < tok.vocab_size and tok.bos_id is None
    assert tok.eos_token == "<|endoftext|>"
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0])  # merges were learned
    _check_documents(tok, TEXTS)
    assert tok.encode_prompt("hello") == tok.encode("hello")
    assert BPETokenizer.train(iter(CORPUS), vocab_size=300).fingerprint == tok.fingerprint

    assert _check_save_load(tok, tmp_path / "prep") == ["tokenizer.json", "mupfast_tokenizer.json"]
    assert load_tokenizer("bpe", directory=tmp_path / "prep").fingerprint == tok.fingerprint
    assert tok.save(tmp_path / "tokenizer.json") == ["tokenizer.json"]  # the old call still works
    assert BPETokenizer.load(tmp_path / "tokenizer.json").fingerprint == tok.fingerprint
    with pytest.raises(ConfigError):
        load_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(CORPUS, vocab_size=257)


def test_bpe_trained_before_eos_tokens_still_loads_but_cannot_end_documents(tmp_path):
    path = tmp_path / "tokenizer.json"
    _byte_level_bpe([], vocab_size=300).save(str(path))
    tok = BPETokenizer.load(path)
    assert tok.eos_id is None and tok.bos_id is None
    assert tok.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # the old scheme
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(DataError, match=re.escape("without <|endoftext|>")):
        tok.encode_documents(["hello"])
    tok.save(tmp_path / "saved")
    assert load_saved_tokenizer(tmp_path / "saved").fingerprint == tok.fingerprint


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def test_gpt2_like_eos_from_the_vocabulary_no_bos(gpt2_dir, tmp_path):
    tok = load_tokenizer(str(gpt2_dir))
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert tok.eos_token == "<|endoftext|>" and tok.eos_id == tok.vocab_size - 1 and tok.bos_id is None
    assert load_tokenizer(str(gpt2_dir / "tokenizer.json")).fingerprint == tok.fingerprint
    long = CORPUS[0] * 3
    assert len(tok.encode(long)) > 8 and tok.decode(tok.encode(long)) == long  # file's truncation is off
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    _check_documents(tok, [*TEXTS, long])
    assert tok.encode_prompt("hello") == tok.encode("hello")
    assert tok.decode([*tok.encode("a"), tok.eos_id]) == "a<|endoftext|>"  # special tokens kept
    _matches_transformers(tok, gpt2_dir / "tokenizer.json", [*TEXTS, long])
    _check_save_load(tok, tmp_path / "saved")


def test_transformers_save_pretrained_directory(gpt2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(gpt2_dir / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    ref.save_pretrained(str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_id == ref.eos_token_id and tok.bos_id is None
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_llama_like_bos_from_post_processor_eos_from_config(llama_dir, tmp_path):
    tok = load_tokenizer(str(llama_dir))
    vocab = Tokenizer.from_file(str(llama_dir / "tokenizer.json")).get_vocab()
    assert tok.bos_id == vocab["<s>"] and tok.eos_id == vocab["</s>"] and tok.eos_token == "</s>"
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_prompt(text) == [tok.bos_id, *tok.encode(text)]
    docs = _check_documents(tok, TEXTS)
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    ref = _matches_transformers(tok, llama_dir / "tokenizer.json", TEXTS)
    assert ref.encode("hello world") == tok.encode_prompt("hello world")  # the ecosystem adds <s> too
    _check_save_load(tok, tmp_path / "saved")

    other = load_tokenizer(str(llama_dir), eos_token="<unk>")
    assert other.eos_id == vocab["<unk>"] and other.bos_id == tok.bos_id
    assert other.fingerprint != tok.fingerprint and other.encode("hello") == tok.encode("hello")
    assert load_saved_tokenizer(tmp_path / "saved").fingerprint == tok.fingerprint
    with pytest.raises(DataError, match=r"'<nope>'") as err:
        load_tokenizer(str(llama_dir), eos_token="<nope>")
    assert str(llama_dir / "tokenizer.json") in str(err.value)


def _variant(llama_dir, tmp_path, *, post=None, config=None, special_map=None):
    """The Llama-like tokenizer with another post-processor and other config files."""
    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    tok.post_processor = post
    tok.save(str(tmp_path / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        if data is not None:
            (tmp_path / name).write_text(json.dumps(data))
    return tok


def test_eos_appended_by_the_post_processor(llama_dir, tmp_path):
    raw = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    s, e = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    post = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", s), ("</s>", e)])
    _variant(llama_dir, tmp_path, post=post, config={"eos_token": "<unk>"})  # the post-processor wins
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (s, e)


def test_eos_as_a_dict_in_special_tokens_map_and_bos_only_with_add_bos_token(llama_dir, tmp_path):
    raw = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    s, unk = raw.token_to_id("<s>"), raw.token_to_id("<unk>")
    special_map = {"eos_token": {"content": "<unk>", "lstrip": False}}  # not a fallback name: read from here
    _variant(llama_dir, tmp_path, config={"bos_token": "<s>", "add_bos_token": True}, special_map=special_map)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (s, unk)
    _variant(llama_dir, tmp_path, config={"bos_token": "<s>", "add_bos_token": False})
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id) == (None, unk)
    _variant(llama_dir, tmp_path, config={"eos_token": "<gone>"})
    with pytest.raises(DataError, match="tokenizer_config.json.*'<gone>'"):
        load_tokenizer(str(tmp_path))


def test_no_eos_anywhere_is_a_data_error(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no EOS token; set data.eos_token"):
        load_tokenizer(str(tmp_path))
    assert load_tokenizer(str(tmp_path), eos_token="[UNK]").eos_id == 1


def test_vocabulary_above_uint16_stores_uint32(big_file, tmp_path):
    tok = load_tokenizer(str(big_file))
    assert tok.vocab_size == 70_002 and tok.token_dtype == np.dtype("<u4")
    assert tok.eos_id == 70_001 and tok.bos_id is None
    texts = ["w0 w65535 w65536 w69999", "w12 nope w66000"]
    docs = _check_documents(tok, texts)
    assert docs[0].tolist() == [0, 65_535, 65_536, 69_999, 70_001]
    assert docs[1].tolist() == [12, 70_000, 66_000, 70_001]
    assert tok.decode(docs[0][:-1]) == "w0 w65535 w65536 w69999"
    _matches_transformers(tok, big_file, texts)
    _check_save_load(tok, tmp_path / "saved")


# ---------------------------------------------------------------- errors


def _one_line_naming(err, path):
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


def test_unusable_paths_are_one_line_data_errors(tmp_path):
    missing = tmp_path / "nothing_here"
    empty = tmp_path / "empty"
    empty.mkdir()
    not_json = tmp_path / "not_json" / "tokenizer.json"
    not_json.parent.mkdir()
    not_json.write_text("this is not JSON\nat all\n")
    not_tok = tmp_path / "other.json"
    not_tok.write_text(json.dumps({"hello": [1, 2, 3]}))
    for spec, named in ((missing, missing), (empty, empty), (not_json.parent, not_json), (not_tok, not_tok)):
        with pytest.raises(DataError) as err:
            load_tokenizer(str(spec))
        _one_line_naming(err, named)


def test_saved_tokenizer_missing_corrupt_or_changed(llama_dir, gpt2_dir, tmp_path):
    with pytest.raises(DataError) as err:
        load_saved_tokenizer(tmp_path)
    _one_line_naming(err, tmp_path / "mupfast_tokenizer.json")
    tok = load_tokenizer(str(llama_dir))
    tok.save(tmp_path)
    meta = tmp_path / "mupfast_tokenizer.json"
    meta.write_text("{not json")
    with pytest.raises(DataError) as err:
        load_saved_tokenizer(tmp_path)
    _one_line_naming(err, meta)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match="fingerprint") as err:
        load_saved_tokenizer(tmp_path)
    _one_line_naming(err, tmp_path / "tokenizer.json")
