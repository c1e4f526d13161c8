"""A trained run outside the trainer: loaded, folded into a plain Hugging Face model, or sampled.

* :mod:`~mupfast.export.load`: a run's config, its latest checkpoint's weights (any ZeRO stage) and
  its tokenizer.
* :mod:`~mupfast.export.fold`: every μP forward multiplier folded into the weights, and the check
  that the folded model computes the same logits.
* :mod:`~mupfast.export.layouts`: the Llama and GPT-2 tensor names and ``config.json``.
* :mod:`~mupfast.export.export`: ``mupfast export``, writing all of it as safetensors.
* :mod:`~mupfast.export.generate`: ``mupfast generate``, sampling with the model's KV cache.
"""

from mupfast.export.export import export_run
from mupfast.export.fold import check_folding, fold_multipliers
from mupfast.export.layouts import layout_for
from mupfast.export.load import load_run, run_tokenizer

__all__ = ["check_folding", "export_run", "fold_multipliers", "layout_for", "load_run", "run_tokenizer"]
