"""HyperP: the rules table (Muon-on-the-sphere matrices, one lr), its transfer rule, and training
through the trainer with every hidden matrix staying on its init sphere."""

import json
import math
import subprocess
import sys

import pytest
import torch

import mupfast.train as trainer
from mupfast.config import with_overrides
from mupfast.errors import ConfigError
from mupfast.explain import format_table, rules_table, table_json
from mupfast.optim import base_lr, build_optimizer
from mupfast.optim.schedules import build_schedule
from mupfast.parametrization import MUON_COMPONENTS, hyperp_own_bases, hyperp_transfer, multipliers
from mupfast.rundir import read_metrics
from tests.helpers import assert_resume_is_bitwise, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HYPERP = ["model.parametrization=hyperp"]


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
        elif r.component == "readout":  # untied: AdamH, Adam's direction on its own sphere
            assert (r.optimizer, r.wd_mult) == ("adamw_sphere", 0.0), r.name
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


def test_logits_scale_like_mup_against_a_base_width():
    """Logits × α_out/m: × 1 without a base width (the anchor), 1/m against one, so the readout's
    per-step logit change does not grow with width under one width-free η."""
    assert multipliers(tiny_config(*HYPERP, "model.output_logits_alpha=3").model).logit_scale == 3.0
    wide = tiny_config(*HYPERP, "model.hidden_size=128", "model.mup_base_hidden_size=32").model
    assert multipliers(wide).logit_scale == pytest.approx(1 / 4)
    root = tiny_config(
        *HYPERP,
        "model.hidden_size=128",
        "model.mup_base_hidden_size=32",
        "model.scale_output_logits_by_d=false",
    )
    assert multipliers(root.model).logit_scale == pytest.approx(1 / 2)


def test_own_bases_make_the_rule_give_the_named_lr():
    cfg = tiny_config(*HYPERP, "model.num_layers=8", "train.steps=30")
    own = with_overrides(cfg, hyperp_own_bases(cfg, 0.3))
    assert hyperp_transfer(own)["lr"] == pytest.approx(0.3, rel=1e-12)
    shallower = with_overrides(cfg, hyperp_own_bases(cfg, 0.3, steps=30, depth=2))  # d0 = 2, L = 8
    assert hyperp_transfer(shallower)["lr"] == pytest.approx(0.3 * math.sqrt(2 / 8), rel=1e-12)


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


def test_hyperp_base_values_must_be_positive_and_its_readout_not_zero():
    with pytest.raises(ConfigError, match="model.readout_zero_init: not with hyperp's readout sphere"):
        tiny_config(*HYPERP, "model.readout_zero_init=true")
    free = rules_table(
        tiny_config(*HYPERP, "model.readout_zero_init=true", "model.hyperp_readout_sphere=false").model
    )
    assert [(r.optimizer, r.init) for r in free if r.component == "readout"] == [("adamw", "zeros")]
    with pytest.raises(ConfigError, match="optim.hyperp_base_lr"):
        tiny_config(*HYPERP, "optim.hyperp_base_lr=0")


def test_explain_shows_the_optimizer_column_and_the_computed_lr():
    cfg = tiny_config(*HYPERP)
    rules = rules_table(cfg.model)
    eta = hyperp_transfer(cfg)["lr"]
    text = format_table(cfg.model, rules, cfg)
    assert "optimizer" in text.splitlines()[1] and "muon_sphere" in text
    assert f"= {eta:.6g}" in text and "optim.lr unused" in text
    assert f"attention logits × {1 / math.sqrt(cfg.model.head_dim):.6g}   (1/√d_head" in text
    table = table_json(cfg.model, rules, cfg)
    assert table["transfer_rule"]["lr"] == pytest.approx(eta)
    assert {r["optimizer"] for r in table["rules"]} == {"adamw", "muon_sphere", "adamw_sphere"}
    proc = subprocess.run(
        [sys.executable, "-m", "mupfast.cli", "explain", "--json", *HYPERP],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["transfer_rule"]["lr"] > 0


def test_muon_groups_are_clipped_like_the_others_and_stay_on_their_sphere():
    cfg = tiny_config(*HYPERP, "clip.max_norm=1e-3")
    torch.manual_seed(0)
    model = trainer.build_model(cfg.model)
    radii = {n: p.detach().norm().item() for n, p in model.named_parameters() if p.ndim == 2}
    opt = build_optimizer(model, cfg)
    assert {g["name"]: g["optimizer"] for g in opt.param_groups}["q"] == "muon_sphere"
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    opt.step()
    assert opt.last_clip_coefs["q"].item() < 1.0  # the Muon group's grad norm was clipped too
    assert "exp_avg" in opt.state[model.blocks[0].attn.q.weight]
    for n, p in model.named_parameters():
        if n in radii and ("attn." in n or "mlp." in n):
            assert p.detach().norm().item() == pytest.approx(radii[n], rel=1e-6), n


def _train_capturing_model(cfg, monkeypatch):
    models = []
    real_build = trainer.build_model

    def capture(model_cfg):
        models.append(real_build(model_cfg))
        return models[-1]

    monkeypatch.setattr(trainer, "build_model", capture)
    result = trainer.train(cfg)
    return result, models[0]


def test_a_tiny_hyperp_model_learns_while_every_hidden_matrix_keeps_its_init_norm(tmp_path, monkeypatch):
    # At d=32 the default readout sphere (radius 0.02·√(V·d) ≈ 1.8) caps the logits near 1; a wider one
    # lets 20 steps show the learning.
    overrides = ["train.steps=20", "train.log_every=1", "train.eval_every=0", "model.output_init_std=0.1"]
    cfg = tiny_config(*HYPERP, *overrides, tmp_path=tmp_path)
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before building the model
    init = {n: p.detach().norm().item() for n, p in trainer.build_model(cfg.model).named_parameters()}
    result, model = _train_capturing_model(cfg, monkeypatch)
    assert result.train_losses[20] < result.train_losses[1] - 1.0
    rec = read_metrics(cfg.train.run_dir, "train")[-1]
    # update 20 used η·schedule(19), η from the transfer rule (B = 4·32 tokens, T = 20·B)
    assert rec["lr/q"] == pytest.approx(hyperp_transfer(cfg)["lr"] * build_schedule(cfg.schedule, 20)(19))
    assert rec["lr/embedding"] == rec["lr/q"]  # one lr for every group
    hidden = [n for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n]
    assert len(hidden) == 2 * 7  # q, k, v, o, gate, up, down per layer
    hidden.append("readout.weight")  # AdamH keeps it on its sphere too
    for n, p in model.named_parameters():
        if n in hidden:
            assert p.detach().norm().item() == pytest.approx(init[n], rel=1e-5), n
        elif n == "tok_emb.weight":
            assert p.detach().norm().item() != pytest.approx(init[n], rel=1e-3)  # AdamW moved it freely


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_stage0_hyperp_matches_single_process(tmp_path):
    from tests.test_train import _deepspeed_run

    base = [
        *HYPERP,
        "train.log_every=1",
        "train.eval_every=0",
        "train.steps=5",
        "train.micro_batch_size=2",
        "clip.max_norm=0.05",  # low enough that the Muon groups' gradients are clipped too
    ]
    single = trainer.train(tiny_config(*base, "train.grad_accum_steps=2", tmp_path=tmp_path / "single"))
    two = _deepspeed_run(tmp_path, "zero0", [*base, "zero.stage=0"], ranks=2)
    assert sorted(two) == list(range(1, 6))
    for step, loss in single.train_losses.items():
        assert two[step] == pytest.approx(loss, rel=2e-5), step
    lrs = {r["step"]: r["lr/q"] for r in read_metrics(tmp_path / "zero0" / "run", "train")}
    single_lrs = {r["step"]: r["lr/q"] for r in read_metrics(tmp_path / "single" / "run", "train")}
    assert lrs == pytest.approx(single_lrs)  # same global batch B on 1 or 2 ranks: same η


def test_resume_restores_muon_momentum_and_radius(tmp_path, monkeypatch):
    overrides = [*HYPERP, "train.log_every=1", "train.eval_every=0", "train.steps=6", "train.save_every=3"]
    # bitwise: momentum buffers and radii came back with the checkpoint
    assert_resume_is_bitwise(overrides, tmp_path, monkeypatch, steps=6, crash_step=3)
