"""Data: a corpus prepared into token shards, and the batch sampler that reads them.

* :mod:`~mupfast.data.corpus` reads documents: text files, JSON Lines (also .gz/.zst) and Parquet.
* :mod:`~mupfast.data.tokenizer`: byte-level, a BPE trained locally, or an existing HF tokenizer.json.
* :mod:`~mupfast.data.prepare` (the ``prepare-data`` verb) tokenizes a corpus in parallel into
  shards in a directory named by a hash of everything that determines them (a second call finds
  them and does no work), through :mod:`~mupfast.data.units` (independent pieces of work, resumable)
  and :mod:`~mupfast.data.assemble` (the shards and their index).
* :mod:`~mupfast.data.shards` is the on-disk shard format: a 64-byte header, then uint16 or uint32 ids.
* :mod:`~mupfast.data.sampler`: :class:`BatchSampler` over many shards and a mixture of sources, a
  batch as a pure function of the step.

Every data problem is a :class:`~mupfast.errors.DataError` with a one-line message naming the file.
"""

from mupfast.data.corpus import corpus_files, read_documents
from mupfast.data.prepare import prepare_data, prepare_sources
from mupfast.data.prepared import PreparedData, load_prepared
from mupfast.data.sampler import BatchSampler, ShardSet
from mupfast.data.shards import HEADER_BYTES, TokenShard, write_shard
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer, load_saved_tokenizer, load_tokenizer
from mupfast.errors import DataError

__all__ = [
    "HEADER_BYTES",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "DataError",
    "PreparedData",
    "ShardSet",
    "TokenShard",
    "corpus_files",
    "load_prepared",
    "load_saved_tokenizer",
    "load_tokenizer",
    "prepare_data",
    "prepare_sources",
    "read_documents",
    "write_shard",
]
