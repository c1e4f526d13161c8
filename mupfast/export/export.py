"""``mupfast export``: a trained run as a plain Hugging Face checkpoint, every μP multiplier folded in.

:func:`export_run` loads the run (:mod:`mupfast.export.load`), folds the multipliers into the weights
and checks the result against the model in SP form (:mod:`mupfast.export.fold`), then writes
``model.safetensors``, ``config.json``, the tokenizer and a record of what was folded in the Llama
or GPT-2 layout (:mod:`mupfast.export.layouts`). Features take part through
:mod:`mupfast.plugins`: ``export_model`` before folding (a fine-tune's adapters merged into the
weights) and ``export_adapters`` for ``--adapters-only`` (the adapters alone, as a PEFT folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupfast.errors import ConfigError
from mupfast.export.fold import check_folding, fold_multipliers
from mupfast.export.granite import check_granite, granite_config, optimizer_groups, unfolded
from mupfast.export.granite import multipliers as granite_multipliers
from mupfast.export.layouts import byte_level_tokenizer_json, hf_config, layout_for, layout_tensors
from mupfast.export.load import load_run, run_tokenizer
from mupfast.plugins import export_adapters, export_model


@dataclass
class ExportResult:
    out_dir: Path
    layout: str
    tied: bool
    factors: dict[str, float]
    fold_error: float
    files: list[str]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: --format: the folded Llama / GPT-2 export (the default), or Granite with the multipliers unfolded.
FORMATS = ("folded", "granite")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    config: str | None = None,
    overrides: list[str] = (),
    force: bool = False,
    adapters_only: bool = False,
    fmt: str = "folded",
) -> ExportResult:
    """Write RUN's latest checkpoint to OUT as safetensors + HF config + tokenizer: μP folded in, or
    (``fmt="granite"``) kept as Granite's config multipliers with μP's optimizer groups beside it."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype: must be one of {', '.join(_DTYPES)} (got {dtype!r})")
    if fmt not in FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise ConfigError(f"--out: {out_dir} exists and is not empty (pass --force to overwrite)")
    run = load_run(run_dir, config=config, overrides=overrides)
    cfg = run.cfg
    layout = layout_for(cfg.model)
    if adapters_only:  # a fine-tune's adapters as a PEFT LoRA folder, for the base run's export
        return _export_adapters(run, layout, out_dir, dtype)
    if fmt == "granite":
        check_granite(cfg.model)
    run.model = export_model(run.model, cfg)  # features: a fine-tune's adapters merged, logits checked
    tokenizer = run_tokenizer(cfg, run.run_dir)
    weights = _granite(run.model, cfg, dtype) if fmt == "granite" else _folded(run.model, layout, dtype)
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in weights.tensors.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", weights.config)
    for name, obj in weights.extra_files.items():
        _write_json(out_dir / name, obj)
    generation = {"max_length": cfg.model.max_seq_len, "do_sample": True, "temperature": 1.0}
    _write_json(out_dir / "generation_config.json", generation)
    how = _write_tokenizer(out_dir, tokenizer, cfg.model.max_seq_len)
    shutil.copyfile(run.run_dir / "config.yaml", out_dir / "mupfast_config.yaml")
    record = {
        "source_run": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.step,
        "layout": weights.layout,
        "dtype": dtype,
        "parametrization": cfg.model.parametrization,
        **weights.record,
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "how_to_encode": how},
    }
    _write_json(out_dir / "mupfast_export.json", record)
    files = sorted(p.name for p in out_dir.iterdir())
    return ExportResult(out_dir, weights.layout, weights.tied, weights.factors, weights.error, files)


@dataclass
class _Weights:
    """What a format writes: tensors by their transformers names, config.json and its record."""

    layout: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    tied: bool
    factors: dict[str, float]
    error: float
    record: dict[str, Any]
    extra_files: dict[str, Any]


def _folded(model, layout: str, dtype: str) -> _Weights:
    cfg = model.cfg
    folded = fold_multipliers(model)
    err = check_folding(model, folded)
    record = {
        "folded_multipliers": folded.factors,
        "readout_tied": folded.tied,
        "fold_check_relative_logit_error": err,
    }
    tensors = layout_tensors(cfg, layout, folded)
    config = hf_config(cfg, layout, folded.tied, dtype)
    return _Weights(layout, tensors, config, folded.tied, folded.factors, err, record, {})


def _granite(model, cfg, dtype: str) -> _Weights:
    tensors = layout_tensors(cfg.model, "llama", unfolded(model))
    factors = granite_multipliers(model)
    config = granite_config(model, dtype, factors)
    record = {"granite_multipliers": factors, "readout_tied": cfg.model.tie_embeddings}
    groups = {"optimizer_groups.json": optimizer_groups(model, cfg)}
    return _Weights("granite", tensors, config, cfg.model.tie_embeddings, factors, 0.0, record, groups)


def _write_tokenizer(out_dir: Path, tokenizer, max_seq_len: int) -> str:
    """tokenizer.json and tokenizer_config.json; returns how ids are encoded, for the record."""
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_len}
    if tokenizer.kind in ("bpe", "hf"):
        tokenizer.save(out_dir)  # tokenizer.json exactly as trained on (and mupfast's note of EOS/BOS)
        how = f"tokenizer.json: the run's {'trained BPE' if tokenizer.kind == 'bpe' else 'tokenizer'}, ids as in training"
        if tokenizer.eos_id is not None:  # a BPE trained before documents ended with EOS has none
            tok_config["eos_token"] = tokenizer.eos_token
        if tokenizer.bos_id is not None:
            tok_config["bos_token"] = tokenizer.decode([tokenizer.bos_id])
    else:
        (out_dir / "tokenizer.json").write_text(byte_level_tokenizer_json())
        how = "byte-level: token id = UTF-8 byte value (0–255, 0 ends a document); tokenizer.json does exactly that"
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    return how


def _export_adapters(run, layout: str, out_dir: Path, dtype: str) -> ExportResult:
    """``--adapters-only``: the features' own parts alone (a fine-tune's adapters as a PEFT LoRA folder)."""
    record = export_adapters(run.model, run.cfg, layout=layout, out_dir=out_dir, dtype=_DTYPES[dtype])
    if record is None:
        raise ConfigError(
            f"--adapters-only: {run.run_dir} has no adapters to write (not an adapter fine-tune)"
        )
    record = {
        "source_run": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.step,
        **record,
    }
    _write_json(out_dir / "mupfast_export.json", record)
    files = sorted(p.name for p in out_dir.iterdir())
    return ExportResult(out_dir, layout, False, {}, 0.0, files)


def _write_json(path: Path, obj: Any) -> None:
    """One of the export's JSON files: indented, newline-terminated."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # export reads RUN/config.yaml; --config (optional) replaces it, overrides apply on top.
    parser.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    parser.add_argument("--out", help="output directory: model.safetensors, config.json, tokenizer")
    parser.add_argument(
        "--dtype", default="float32", help="float32, bfloat16 or float16 (default %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument(
        "--adapters-only",
        action="store_true",
        help="a fine-tuned run: write its adapters as a PEFT LoRA folder (load it onto the base run's export)",
    )
    parser.add_argument(
        "--format",
        default="folded",
        choices=FORMATS,
        help="folded: every μP multiplier folded into Llama/GPT-2 weights (default); granite: the weights as "
        "trained, the multipliers in Granite's config, μP's optimizer groups in optimizer_groups.json",
    )


def run(args: argparse.Namespace) -> int:
    """The ``export`` verb."""
    if not args.run:
        raise ConfigError("export: --run DIR is required")
    if not args.out:
        raise ConfigError("export: --out DIR is required")
    res = export_run(
        args.run,
        args.out,
        dtype=args.dtype,
        config=args.config,
        overrides=args.overrides,
        force=args.force,
        adapters_only=args.adapters_only,
        fmt=args.format,
    )
    if args.adapters_only:
        print(f"wrote the adapters of {args.run} to {res.out_dir} (PEFT LoRA, {res.layout} module names)")
        return 0
    f = res.factors
    if res.layout == "granite":
        print(
            f"exported {args.run} to {res.out_dir} (Granite, μP unfolded: embedding × {f['embedding_multiplier']:.6g}, "
            f"attention × {f['attention_multiplier']:.6g}, residual × {f['residual_multiplier']:.6g}, logits ÷ "
            f"{f['logits_scaling']:.6g}; per-group lrs in optimizer_groups.json)"
        )
        return 0
    print(
        f"exported {args.run} to {res.out_dir} ({res.layout} layout, readout {'tied' if res.tied else 'untied'}; "
        f"folded: embedding × {f['embedding']:.6g}, readout × {f['readout']:.6g}, W_q × {f['attention_q']:.6g}, "
        f"residual × {f['residual_branches']:.6g}; fold check {res.fold_error:.1e})"
    )
    return 0
