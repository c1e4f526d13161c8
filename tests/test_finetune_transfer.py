"""μTransfer of the fine-tuning lr: with the adapters' μP rules the LoRA lr optimum stays put from
width 32 to 128 (m = 4); with every adapter lr × 1 (A's lr not shrinking with its fan-in) it moves."""

from __future__ import annotations

import inspect

import pytest
import torch

from mupfast.config import load_config
from mupfast.finetune.adapters import attach_adapters
from mupfast.model import build_model
from mupfast.optim import build_optimizer

pytestmark = pytest.mark.slow  # about a minute on 2 cores

LOG2_LRS = [-9, -8, -7, -6, -5]


def _corpus(*modules) -> torch.Tensor:
    return torch.tensor(list(b"".join(open(inspect.getsourcefile(m), "rb").read() for m in modules)))


def _config(width: int, lr: float, method: str, steps: int):
    return load_config(
        None,
        [
            f"model.hidden_size={width}",
            f"model.filter_size={4 * width}",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.max_seq_len=32",
            "model.parametrization=mup",
            "model.mup_base_hidden_size=32",
            "model.mup_base_filter_size=128",
            "model.init_std=0.1",
            "model.embeddings_scale=4",
            f"finetune.method={method}",
            "finetune.base_run=unused",
            "finetune.rank=4",
            "finetune.target_components=[q, v, o, ffn_in, ffn_out]",
            f"optim.lr={lr}",
            f"train.steps={steps}",
            "train.seq_len=32",
            "schedule.kind=constant",
            "clip.max_norm=0",
        ],
    )


def _train(model, cfg, data, steps: int, seed: int, flat_lrs: bool = False) -> float:
    opt = build_optimizer(model, cfg)
    if flat_lrs:
        for g in opt.param_groups:
            g["lr_mult"] = 1.0
        opt.lr_schedule.apply()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=gen)
        w = torch.stack([data[i : i + 33] for i in starts])
        loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        opt.step()
        opt.lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def _optimum(losses: list[float]) -> float:
    """log2 lr of the minimum, refined by a parabola through it and its neighbours."""
    i = min(range(1, len(losses) - 1), key=lambda k: losses[k])
    a, b, c = losses[i - 1 : i + 2]
    return LOG2_LRS[i] + 0.5 * (a - c) / (a - 2 * b + c)


def test_the_lora_lr_optimum_transfers_across_width_under_the_mup_adapter_rules(one_torch_thread):
    import argparse
    import csv
    import dataclasses
    import email.message
    import html.parser
    import json
    import os
    import textwrap

    # Pretrain on some standard-library modules, fine-tune on others (another domain of the same language).
    pretrain = _corpus(json.decoder, os, dataclasses, argparse)
    finetune = _corpus(email.message, textwrap, html.parser, csv)
    optima = {}
    for width in (32, 128):
        cfg = _config(width, 1e-2, "none", 150)
        torch.manual_seed(0)
        base = build_model(cfg.model)
        _train(base, cfg, pretrain, 150, seed=5)
        state = base.state_dict()
        for flat in (False, True):
            losses = []
            for k in LOG2_LRS:
                cfg = _config(width, 2.0**k, "lora", 80)
                torch.manual_seed(0)
                model = build_model(cfg.model)
                model.load_state_dict(state)
                attach_adapters(model, cfg)
                losses.append(_train(model, cfg, finetune, 80, seed=7, flat_lrs=flat))
            optima[width, flat] = _optimum(losses)
    mup_shift = optima[128, False] - optima[32, False]
    flat_shift = optima[128, True] - optima[32, True]
    assert abs(mup_shift) < 0.3, optima
    assert flat_shift < -0.5, optima  # A's lr too large at width: the optimum falls
