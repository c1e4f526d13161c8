"""Small builders shared by the tests."""

from __future__ import annotations

from mupfast.config import Config, load_config


def tiny_config(*overrides: str, tmp_path=None) -> Config:
    """A model small enough for many CPU runs per test file, with any overrides applied."""
    base = [
        "model.vocab_size=256",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.filter_size=64",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.progress=false",
        "train.eval_batches=2",
        "data.max_corpus_bytes=300000",
    ]
    if tmp_path is not None:
        base += [f"train.run_dir={tmp_path}/run", f"data.dir={tmp_path}/data"]
    return load_config(None, [*base, *overrides])
