"""HyperP: the rules table (Muon-on-the-sphere matrices, one lr), its transfer rule, and training
through the trainer with every hidden matrix staying on its init sphere."""

import json
import math
import subprocess
import sys

import pytest
import torch

import mupfast.train as T
from mupfast.config import ConfigError
from mupfast.metrics import read_metrics
from mupfast.optim import base_lr, build_optimizer
from mupfast.parametrization import (
    MUON_COMPONENTS,
    format_table,
    hyperp_transfer,
    multipliers,
    rules_table,
    table_json,
)
from tests.helpers import tiny_config

HYPERP = ["model.parametrization=hyperp"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread avoids spinning against a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hidden_matrices_take_muon_on_the_sphere_and_everything_one_lr():
    cfg = tiny_config(*HYPERP, "model.num_layers=3")
    rules = rules_table(cfg.model)
    hidden = [r for r in rules if r.component in MUON_COMPONENTS]
    assert {r.component for r in hidden} == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    for r in rules:
        assert r.lr_mult == 1.0, r.name
        if r.component in MUON_COMPONENTS:
            assert (r.optimizer, r.wd_mult) == ("muon_sphere", 0.0), r.name
            assert r.init_std == pytest.approx(1 / math.sqrt(3 * r.shape[1])), r.name  # kaiming-uniform std
        else:
            assert r.optimizer == "adamw", r.name
    by = {r.name: r for r in rules}
    assert by["blocks.0.attn.o.weight"].forward_mult == pytest.approx(1 / math.sqrt(6))
    assert by["blocks.2.mlp.down.weight"].forward_mult == pytest.approx(1 / math.sqrt(6))
    assert by["blocks.0.attn_norm.weight"].wd_mult == 0.0
    assert by["tok_emb.weight"].init_std == 1e-4 and by["readout.weight"].init_std == 0.02
    mult = multipliers(cfg.model)
    assert mult.logit_scale == 1.0 and mult.residual_scale == pytest.approx(1 / math.sqrt(6))
    assert mult.attention_scale == pytest.approx(1 / math.sqrt(cfg.model.head_dim))


def test_other_parametrizations_keep_adamw_everywhere():
    for p in ("sp", "mup", "completep"):
        rules = rules_table(tiny_config(f"model.parametrization={p}").model)
        assert {r.optimizer for r in rules} == {"adamw"}, p


def test_transfer_rule_scales_with_batch_depth_and_tokens():
    base = [
        "optim.hyperp_base_lr=0.015",
        "optim.hyperp_base_batch_tokens=128",
        "optim.hyperp_base_tokens=12800",
        "model.hyperp_base_depth=2",
        "model.num_layers=2",
        "train.micro_batch_size=4",
        "train.steps=100",
    ]
    at_base = hyperp_transfer(tiny_config(*HYPERP, *base))
    assert at_base["batch_tokens"] == 128 and at_base["tokens"] == 12800
    assert at_base["lr"] == pytest.approx(0.015)  # B = B0, L = d0, T = T0
    # 2× batch at the same steps: √2 from B and 2^-0.32 from the doubled horizon.
    two_ranks = hyperp_transfer(tiny_config(*HYPERP, *base), world_size=2)["lr"]
    assert two_ranks == pytest.approx(0.015 * math.sqrt(2) * 2**-0.32)
    deeper = hyperp_transfer(tiny_config(*HYPERP, *base, "model.num_layers=8"))["lr"]
    assert deeper == pytest.approx(0.015 / 2)
    longer = hyperp_transfer(tiny_config(*HYPERP, *base, "train.steps=1000"))["lr"]
    assert longer == pytest.approx(0.015 * 10**-0.32)
    cfg = tiny_config(*HYPERP, *base, "train.steps=1000")
    assert base_lr(cfg) == pytest.approx(longer) and base_lr(tiny_config(*base)) == cfg.optim.lr


def test_hyperp_under_zero_partitions_is_a_config_error():
    with pytest.raises(ConfigError, match=r"zero.stage: hyperp needs 0 .*whole matrices"):
        tiny_config(*HYPERP, "zero.stage=1")
    with pytest.raises(ConfigError, match="optim.hyperp_base_lr"):
        tiny_config(*HYPERP, "optim.hyperp_base_lr=0")


def test_explain_shows_the_optimizer_column_and_the_computed_lr():
    cfg = tiny_config(*HYPERP)
    rules = rules_table(cfg.model)
    eta = hyperp_transfer(cfg)["lr"]
    text = format_table(cfg.model, rules, cfg)
    assert "optimizer" in text.splitlines()[1] and "muon_sphere" in text
    assert f"= {eta:.6g}" in text and "optim.lr unused" in text
    table = table_json(cfg.model, rules, cfg)
    assert table["transfer_rule"]["lr"] == pytest.approx(eta)
    assert {r["optimizer"] for r in table["rules"]} == {"adamw", "muon_sphere"}
    proc = subprocess.run(
        [sys.executable, "-m", "mupfast.cli", "explain", "--json", *HYPERP],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["transfer_rule"]["lr"] > 0
