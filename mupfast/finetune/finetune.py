"""``mupfast finetune --run BASE_RUN --config FT.yaml [overrides]``: fine-tune a trained run.

The fine-tune's config is FT.yaml (its ``finetune``, ``data``, ``train``, ``optim``, ``schedule``,
``clip`` and ``zero`` sections) on top of the base run's model: the ``model`` section comes from
``BASE_RUN/config.yaml`` (only the backends may be changed), and its tokenizer and train.seq_len
too unless FT.yaml sets them. The training itself is ``mupfast train``'s loop (DeepSpeed, schedules, clipping,
checkpoints, resume, metrics) with the fine-tuning hooks of :mod:`mupfast.finetune.attach`. Under
the deepspeed launcher: ``deepspeed --module mupfast.finetune.finetune --run BASE --config FT.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from mupfast.config import Config, config_from_dict, read_raw_config
from mupfast.config.validate import validate
from mupfast.errors import ConfigError
from mupfast.finetune.attach import FREE_MODEL_KEYS


def finetune_config(base_run: str | Path, config: str | None, overrides: list[str] = ()) -> Config:
    """The fine-tune's resolved config: FT.yaml and overrides over the base run's model and tokenizer."""
    from mupfast.export.load import read_run_config

    base = read_run_config(base_run)
    raw = read_raw_config(config, list(overrides))
    model = raw.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError("model: expected a mapping")
    fixed = sorted(set(model) - set(FREE_MODEL_KEYS))
    if fixed:
        raise ConfigError(
            f"model.{fixed[0]}: a fine-tune's model is its base run's ({base_run}/config.yaml); only "
            f"{', '.join(FREE_MODEL_KEYS)} may be set"
        )
    raw["model"] = {**dataclasses.asdict(base.model), **model}
    ft = raw.setdefault("finetune", {}) or {}
    raw["finetune"] = ft
    if ft.get("base_run") and Path(ft["base_run"]).resolve() != Path(base_run).resolve():
        raise ConfigError(f"finetune.base_run: {ft['base_run']} differs from --run {base_run}")
    ft["base_run"] = str(base_run)
    ft.setdefault("method", "lora")
    if ft["method"] == "none":
        raise ConfigError("finetune.method: none is pretraining; choose full, lora, adalora or adamole")
    data = raw.setdefault("data", {}) or {}
    raw["data"] = data
    if "tokenizer" not in data:  # the base run's tokenizer: the ids its model was trained on
        saved = Path(base_run) / "tokenizer.json"
        data["tokenizer"] = (
            str(saved) if base.data.tokenizer != "byte" and saved.is_file() else base.data.tokenizer
        )
        if base.data.eos_token is not None:
            data.setdefault("eos_token", base.data.eos_token)
    train = raw.setdefault("train", {}) or {}
    raw["train"] = train
    train.setdefault("seq_len", base.train.seq_len)  # the base's context, unless FT.yaml sets one
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="the base run directory (config.yaml + checkpoints/) to fine-tune")


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` verb: build the config, prepare prompt/completion data if any, train."""
    from mupfast.finetune.data import prepare_finetune_data
    from mupfast.train import train

    if not args.run:
        raise ConfigError("finetune: --run BASE_RUN_DIR is required")
    cfg = prepare_finetune_data(finetune_config(args.run, args.config, args.overrides))
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        val = result.val_losses.get(result.steps)
        print(
            f"fine-tuned {args.run} ({cfg.finetune.method}) into {result.run_dir}  (steps {result.steps}, "
            f"val loss {val if val is None else f'{val:.4f}'}, {result.tokens_per_s:,.0f} tokens/s)"
        )
    return 0


if __name__ == "__main__":  # under the deepspeed launcher (it appends --local_rank=N)
    from mupfast.cli import program

    program(["finetune", *sys.argv[1:]])
