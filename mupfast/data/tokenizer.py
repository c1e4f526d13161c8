"""Tokenizers: byte-level (vocab 256), a BPE trained locally, and any Hugging Face ``tokenizer.json``.

All three have the interface of :class:`BaseTokenizer`; every one has an EOS (documents in token
shards end with it) and some a BOS. ``save(directory)`` is undone by :func:`load_saved_tokenizer`.
This module imports the HF package ``tokenizers`` lazily and by its absolute name, which works as long
as no file inside ``mupfast/`` is run directly as a script.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mupfast.atomic import write_text_atomically
from mupfast.errors import ConfigError, DataError

UINT16_VOCAB = 1 << 16  # vocabularies of up to this many ids store them as uint16, larger ones as uint32
MAX_IDS = 1 << 32  # every id must fit uint32
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "mupfast_tokenizer.json"
BPE_EOS = "<|endoftext|>"
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # the fallback, first present wins


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _fingerprint(json_str: str, eos_id: int, bos_id: int | None) -> str:
    return _short_hash(f"mupfast-tokenizer-v2 eos={eos_id} bos={bos_id}\n".encode() + json_str.encode())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({_first_line(e)})") from None


class BaseTokenizer:
    """What every tokenizer has. ``fingerprint`` (≤ 32 ASCII chars, recorded in every token shard)
    hashes all that decides the ids a document gets; ``vocab_size`` counts every id, added tokens too.
    """

    kind: str
    vocab_size: int
    fingerprint: str
    eos_id: int  # None only for a BPE trained before EOS tokens (it cannot encode documents)
    eos_token: str
    bos_id: int | None = None
    source: str  # where it came from (recorded in mupfast_tokenizer.json, not part of the fingerprint)

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= UINT16_VOCAB else np.dtype("<u4")

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """What generation feeds the model: [BOS] + encode(text), no EOS."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def save(self, directory: str | Path) -> list[str]:
        """Write what load_saved_tokenizer(directory) needs; returns the file names written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        keys = ("kind", "eos_id", "bos_id", "eos_token", "fingerprint", "source")
        write_text_atomically(d / META_FILE, json.dumps({k: getattr(self, k) for k in keys}, indent=2) + "\n")
        return [META_FILE]

    def __repr__(self) -> str:
        ids = f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id}"
        return f"{type(self).__name__}({ids}, fingerprint={self.fingerprint!r})"


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens: vocab 256, lossless, nothing to train. EOS is byte 0 (NUL, absent from text)."""

    kind = "byte"
    vocab_size = 256
    eos_id = 0
    eos_token = "\x00"
    source = "byte"
    fingerprint = _short_hash(b"mupfast-byte-tokenizer-v2 eos=0 bos=None")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8") + b"\0", dtype=np.uint8).astype("<u2") for t in texts]


def _parse(json_str: str, where: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON, with any truncation or padding the file sets turned off."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(json_str)
    except Exception as e:  # the library raises a bare Exception
        raise DataError(f"{where}: not a Hugging Face tokenizer.json ({_first_line(e)})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


class HFTokenizer(BaseTokenizer):
    """A Hugging Face ``tokenizers`` JSON with a chosen EOS and BOS; :meth:`from_path` detects them."""

    kind = "hf"

    def __init__(
        self,
        json_str: str,
        *,
        eos_id: int | None,
        bos_id: int | None = None,
        source: str = TOKENIZER_FILE,
        parsed: Any = None,
    ):
        """``parsed``: the ``tokenizers.Tokenizer`` of json_str when the caller has it (skips parsing again)."""
        self._json = json_str
        self._tok = parsed if parsed is not None else _parse(json_str, source)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for name, i in (("eos", eos_id), ("bos", bos_id)):
            if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise DataError(f"{source}: {name} id {i!r} is outside the vocabulary ({self.vocab_size})")
        self.eos_id, self.bos_id, self.source = eos_id, bos_id, source
        self.eos_token = None if eos_id is None else self._tok.id_to_token(eos_id)
        # a BPE from before EOS tokens keeps its old fingerprint, the hash of its JSON alone
        self.fingerprint = (
            _short_hash(json_str.encode()) if eos_id is None else _fingerprint(json_str, eos_id, bos_id)
        )

    @classmethod
    def from_path(cls, path: str | Path, *, eos_token: str | None = None) -> HFTokenizer:
        """A tokenizer.json, or a directory holding one (as ``save_pretrained`` leaves it)."""
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{p}: not found (expected a {TOKENIZER_FILE} or a directory holding one)")
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"{p}: no {TOKENIZER_FILE} in this directory")
        json_str = _read_text(file)
        tok = _parse(json_str, file)
        eos_id, bos_id = _detect_special(tok, file, eos_token)
        return cls(json_str, eos_id=eos_id, bos_id=bos_id, source=str(file.resolve()), parsed=tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.eos_id is None:
            raise DataError(f"{self.source}: a BPE without {BPE_EOS} cannot end documents; prepare again")
        head, tail, dtype = [] if self.bos_id is None else [self.bos_id], [self.eos_id], self.token_dtype
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.array(head + e.ids + tail, dtype=dtype) for e in encodings]

    def save(self, directory: str | Path) -> list[str]:
        """``tokenizer.json`` (the JSON as read, byte for byte) + ``mupfast_tokenizer.json`` in directory.

        A path ending in ``.json`` (the old call) writes only the tokenizer JSON, to that file.
        """
        target = Path(directory)
        if target.suffix == ".json":
            write_text_atomically(target, self._json)
            return [target.name]
        target.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target / TOKENIZER_FILE, self._json)
        return [TOKENIZER_FILE, *super().save(target)]


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style) trained locally, with ``<|endoftext|>`` as its EOS and no BOS.

    One trained before EOS tokens (no ``<|endoftext|>``) still loads, to decode and encode prompts
    for old runs: its ``eos_id`` is None, its fingerprint the old one, and encode_documents refuses.
    """

    kind = "bpe"

    def __init__(self, json_str: str, *, source: str = "trained"):
        tok = _parse(json_str, source)
        super().__init__(json_str, eos_id=tok.token_to_id(BPE_EOS), source=source, parsed=tok)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
        """Train on ``texts`` (documents, any iterable: streamed, not held in memory); deterministic."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not 257 < vocab_size <= MAX_IDS:
            raise ValueError(f"BPE vocab_size must be in (257, {MAX_IDS}]: 256 bytes + {BPE_EOS} + merges")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[BPE_EOS],
            show_progress=progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok.to_str())

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """The BPE in a tokenizer.json file (as ``save(path_to_tokenizer.json)`` wrote it)."""
        return cls(_read_text(Path(path)), source=str(path))


def _added_around(tok: Any) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    n = len(plain)
    for k in range(len(full) - n + 1):
        if plain and full[k : k + n] == plain:
            return full[:k], full[k + n :]
    return [], []


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _configs(directory: Path) -> dict[str, tuple[Path, dict]]:
    """tokenizer_config.json and special_tokens_map.json (in that order), those present in directory."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable ({_first_line(e)})") from None
            if isinstance(data, dict):
                found[name] = (path, data)
    return found


def _id_of(tok: Any, name: str, where: Path, key: str) -> int:
    i = tok.token_to_id(name)
    if i is None:
        raise DataError(f"{where}: {key} {name!r} is not in the tokenizer's vocabulary")
    return i


def _detect_special(tok: Any, file: Path, eos_token: str | None) -> tuple[int, int | None]:
    """(eos_id, bos_id) of a tokenizer.json: see load_tokenizer for the order of the sources."""
    before, after = _added_around(tok)
    configs = _configs(file.parent)
    config_eos = [
        (path, name) for path, data in configs.values() if (name := _token_name(data.get("eos_token")))
    ]
    if eos_token is not None:
        eos_id = _id_of(tok, eos_token, file, "eos_token")
    elif after:
        eos_id = after[-1]
    elif config_eos:
        eos_id = _id_of(tok, config_eos[0][1], config_eos[0][0], "eos_token")
    elif named := [i for n in EOS_NAMES if (i := tok.token_to_id(n)) is not None]:
        eos_id = named[0]
    else:
        raise DataError(f"{file}: has no EOS token; set data.eos_token")
    if len(before) == 1:
        return eos_id, before[0]
    path, config = configs.get("tokenizer_config.json", (file, {}))
    if config.get("add_bos_token") is True and (name := _token_name(config.get("bos_token"))):
        return eos_id, _id_of(tok, name, path, "bos_token")
    return eos_id, None


def load_saved_tokenizer(directory: str | Path) -> BaseTokenizer:
    """The tokenizer ``save(directory)`` wrote, checked against its recorded fingerprint."""
    d = Path(directory)
    meta_path = d / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind, fingerprint, eos_id, bos_id = meta["kind"], meta["fingerprint"], meta["eos_id"], meta["bos_id"]
    except FileNotFoundError:
        raise DataError(f"{meta_path}: missing (no tokenizer saved in {d})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
    file = d / TOKENIZER_FILE
    tok: BaseTokenizer
    if kind == "byte":
        file, tok = meta_path, ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer(_read_text(file), source=str(file))
    elif kind == "hf":
        tok = HFTokenizer(_read_text(file), eos_id=eos_id, bos_id=bos_id, source=str(file))
    else:
        raise DataError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    if tok.fingerprint != fingerprint:
        raise DataError(f"{file}: fingerprint {tok.fingerprint} differs from {META_FILE}'s {fingerprint}")
    if kind != "byte" and isinstance(meta.get("source"), str):
        tok.source = meta["source"]  # where it first came from
    return tok


def load_tokenizer(
    spec: str, *, eos_token: str | None = None, directory: Path | None = None
) -> BaseTokenizer:
    """spec "byte" → ByteTokenizer; "bpe" → the BPE saved in ``directory`` (a prepared data dir;
    load_saved_tokenizer); anything else is the path of a tokenizer.json or of a directory holding one (HF).

    An HF tokenizer's EOS: ``eos_token`` if given; else the token its post-processor appends to a single
    sequence; else ``eos_token`` of tokenizer_config.json / special_tokens_map.json beside the file; else
    the first of <|endoftext|>, <|end_of_text|>, </s>, <eos> in the vocabulary. Its BOS: the one token
    the post-processor prepends; else tokenizer_config.json's ``bos_token`` if its ``add_bos_token``
    is true; else none.
    """
    if spec not in ("byte", "bpe"):
        return HFTokenizer.from_path(spec, eos_token=eos_token)
    if spec == "byte":
        tok: BaseTokenizer = ByteTokenizer()
    elif directory is None:
        raise ConfigError("data.tokenizer: bpe is loaded from a prepared data directory (none given)")
    elif (tok := load_saved_tokenizer(directory)).kind != "bpe":
        raise DataError(f"{Path(directory) / META_FILE}: holds a {tok.kind} tokenizer, not bpe")
    if eos_token is not None and eos_token != tok.eos_token:
        raise ConfigError(f"data.eos_token: the {spec} tokenizer's EOS is fixed ({tok.eos_token!r})")
    return tok
