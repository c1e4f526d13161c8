"""Data: a corpus prepared into token shards, and the batch sampler that reads them.

* :mod:`~mupfast.data.prepare` turns a corpus into ``train.bin`` / ``val.bin`` shards in a directory
  named by a hash of everything that determines them (a second call finds them and does no work);
  it is also the ``prepare-data`` verb.
* :mod:`~mupfast.data.shards` is the on-disk shard format: a 64-byte header, then uint16 token ids.
* :mod:`~mupfast.data.tokenizer`: byte-level, and a BPE trained locally with HF ``tokenizers``.
* :mod:`~mupfast.data.sampler`: :class:`BatchSampler`, a batch as a pure function of the step.

Every data problem is a :class:`~mupfast.errors.DataError` with a one-line message naming the file.
"""

from mupfast.data.prepare import PreparedData, corpus_files, load_prepared, prepare_data, read_corpus
from mupfast.data.sampler import BatchSampler
from mupfast.data.shards import HEADER_BYTES, TokenShard, write_shard
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from mupfast.errors import DataError

__all__ = [
    "HEADER_BYTES",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "DataError",
    "PreparedData",
    "TokenShard",
    "corpus_files",
    "load_prepared",
    "load_tokenizer",
    "prepare_data",
    "read_corpus",
    "write_shard",
]
