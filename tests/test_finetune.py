"""`mupfast finetune` with LoRA: adapters start as the identity, only they train (the base stays bit
for bit), their μP rules reach the optimizer groups, and the verb runs the trainer end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

import mupfast.train as trainer
from mupfast.cli import main
from mupfast.errors import ConfigError
from mupfast.export.load import read_checkpoint_weights
from mupfast.finetune.adapters import attach_adapters
from mupfast.finetune.attach import load_base_weights
from mupfast.finetune.finetune import finetune_config
from mupfast.finetune.lora import ADAPTER_MARK, AdaptedLinear, LoraAdapter
from mupfast.model import build_model
from mupfast.optim import build_param_groups
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config

MUP = ["model.parametrization=mup", "model.mup_base_hidden_size=32", "model.mup_base_filter_size=64"]


def make_base_run(root, *overrides: str, seed: int = 0):
    """A run directory as the trainer leaves it, holding a random model (no training needed)."""
    cfg = tiny_config(*MUP, *overrides, tmp_path=root)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    run_dir = root / "run"
    tag = run_dir / "checkpoints" / "step00000007"
    tag.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save({"module": model.state_dict(), "step": 7}, tag / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(tag.name)
    return run_dir, model.eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared-data cache for the module (preparation is keyed by the corpus fingerprint)."""
    return tmp_path_factory.mktemp("data")


def ft_config(base_run, tmp_path, data_dir, *overrides: str):
    common = [
        "train.progress=false",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.eval_every=0",
        "data.max_corpus_bytes=300000",
        f"data.dir={data_dir}",
        f"train.run_dir={tmp_path}/ft",
    ]
    return finetune_config(base_run, None, [*common, *overrides])


def adapted(cfg, base_run):
    model = build_model(cfg.model)
    load_base_weights(model, cfg)
    attach_adapters(model, cfg)
    return model.eval()


def adapted_by(method: str, tmp_path, data_dir):
    """(config, adapted model, base model): a random base run with ``method`` on q, v and ffn_out."""
    base_run, base = make_base_run(tmp_path)
    cfg = ft_config(
        base_run,
        tmp_path,
        data_dir,
        f"finetune.method={method}",
        "finetune.target_components=[q, v, ffn_out]",
    )
    return cfg, adapted(cfg, base_run), base


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v", "o", "ffn_in", "ffn_out"]])
def test_lora_starts_as_the_identity(tmp_path, data_dir, targets):
    base_run, base = make_base_run(tmp_path)
    cfg = ft_config(base_run, tmp_path, data_dir, f"finetune.target_components={targets}")
    model = adapted(cfg, base_run)
    n_adapted = sum(isinstance(m, AdaptedLinear) for m in model.modules())
    assert n_adapted == 2 * (len(targets) + ("ffn_in" in targets))  # ffn_in is gate and up
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter.lora_" in n for n in trainable)


@pytest.mark.parametrize("method", ["lora", "adalora", "adamole"])
def test_forward_multipliers_change_on_an_adapted_model(tmp_path, data_dir, method):
    """PBT's explore calls set_multipliers; on a model with adapters attached it must change the
    base's multipliers and keep the adapters' (its next forward equals a model built with the new
    values and the same weights)."""
    cfg, model, _ = adapted_by(method, tmp_path, data_dir)
    with torch.no_grad():  # adapters that change the output, so theirs is part of what is compared
        for n, p in model.named_parameters():
            if ADAPTER_MARK in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = model(tokens)
    values = dict(embeddings_scale=3.0, output_logits_alpha=0.5, attention_logits_alpha=2.0)
    model.set_multipliers(**values)
    fresh = build_model(dataclasses.replace(cfg.model, **values))
    attach_adapters(fresh, cfg)
    fresh.load_state_dict(model.state_dict())
    after = model(tokens)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh.eval()(tokens), rtol=0, atol=0)


def test_lora_forward_and_gradients_match_a_float64_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=True)
    layer = AdaptedLinear(base, LoraAdapter(48, 40, rank=4, alpha=8.0))
    with torch.no_grad():
        layer.adapter.lora_A.normal_()
        layer.adapter.lora_B.normal_()
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    A, B = (p.detach().double().requires_grad_() for p in (layer.adapter.lora_A, layer.adapter.lora_B))
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ (base.weight.double() + 2.0 * B @ A).t() + base.bias.double()
    ref.backward(g.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(out, ref) < 1e-6
    assert rel(x.grad, x64.grad) < 1e-6
    assert rel(layer.adapter.lora_A.grad, A.grad) < 1e-6
    assert rel(layer.adapter.lora_B.grad, B.grad) < 1e-6
    merged = layer.merged()
    assert rel(merged(x.detach()), ref.detach()) < 1e-6


def test_optimizer_groups_hold_only_adapters_with_their_mup_multipliers(tmp_path, data_dir):
    # Width 64 against a base of 32: m = 2, m_f = 2 (filter 128 vs 64).
    over = ["model.hidden_size=64", "model.filter_size=128", "model.num_heads=4"]
    base_run, _ = make_base_run(tmp_path, *over)
    cfg = ft_config(
        base_run, tmp_path, data_dir, "finetune.target_components=[q, ffn_out]", "finetune.lora_plus_ratio=4"
    )
    model = adapted(cfg, base_run)
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    assert set(groups) == {"q.lora_A", "q.lora_B", "ffn_out.lora_A", "ffn_out.lora_B"}
    assert groups["q.lora_A"]["lr_mult"] == pytest.approx(1 / 2)  # fan-in d grows: 1/m
    assert groups["ffn_out.lora_A"]["lr_mult"] == pytest.approx(1 / 2)  # fan-in filter: 1/m_f
    assert groups["q.lora_B"]["lr_mult"] == groups["ffn_out.lora_B"]["lr_mult"] == 4.0  # fan-out only: ratio
    n_adapter = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_adapter == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_finetune_trains_only_the_adapters_and_keeps_the_base_bit_identical(tmp_path, data_dir):
    base_run, base = make_base_run(tmp_path)
    ft = tmp_path / "ft.yaml"
    ft.write_text(
        yaml.safe_dump({"finetune": {"method": "lora", "rank": 4, "target_components": ["q", "v", "o"]}})
    )
    common = [
        "train.steps=6",
        "train.progress=false",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.eval_every=0",
        "optim.lr=1e-2",
        "data.max_corpus_bytes=300000",
        f"data.dir={data_dir}",
        f"train.run_dir={tmp_path}/ft",
    ]
    assert main(["finetune", "--run", str(base_run), "--config", str(ft), *common]) == 0
    state, _, step = read_checkpoint_weights(tmp_path / "ft")
    assert step == 6
    base_state = base.state_dict()
    for k, v in base_state.items():
        assert torch.equal(state[k], v), k  # frozen: bit for bit
    adapters = {k: v for k, v in state.items() if ".adapter." in k}
    assert len(adapters) == 2 * 3 * 2  # layers × targets × (A, B)
    assert all(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))
    rec = read_metrics(tmp_path / "ft", "train")[-1]
    lrs = {k for k in rec if k.startswith("lr/")}
    assert lrs == {f"lr/{t}.lora_{x}" for t in ("q", "v", "o") for x in "AB"}
    losses = [r["loss"] for r in read_metrics(tmp_path / "ft", "train")]
    assert losses[-1] < losses[0]
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["finetune"]["base_run"] == str(base_run) and saved["model"]["hidden_size"] == 32


def test_a_fine_tune_resumes_with_the_uninterrupted_losses(tmp_path, data_dir, monkeypatch):
    from tests.helpers import crash_after_checkpoint_then_resume

    base_run, _ = make_base_run(tmp_path)
    over = ["train.steps=5", "train.save_every=2", "finetune.method=lora", "optim.lr=1e-2"]
    full = ft_config(base_run, tmp_path / "a", data_dir, *over)
    trainer.train(full)
    cut = ft_config(base_run, tmp_path / "b", data_dir, *over)
    crash_after_checkpoint_then_resume(cut, 2, monkeypatch)

    def losses(cfg):
        return {r["step"]: r["loss"] for r in read_metrics(cfg.train.run_dir, "train")}

    assert losses(cut) == losses(full)


def test_the_base_runs_model_cannot_be_changed(tmp_path, data_dir):
    base_run, _ = make_base_run(tmp_path)
    with pytest.raises(ConfigError, match="model.hidden_size"):
        ft_config(base_run, tmp_path, data_dir, "model.hidden_size=64")
    with pytest.raises(ConfigError, match="finetune.target_components"):
        ft_config(base_run, tmp_path, data_dir, "finetune.target_components=[readout]")


@pytest.mark.parametrize("name", ["finetune-lora", "finetune-adalora", "finetune-adamole"])
def test_the_shipped_fine_tuning_configs_load_over_a_base_run(tmp_path, name):
    from tests.helpers import ROOT

    base_run, _ = make_base_run(tmp_path)
    cfg = finetune_config(base_run, str(ROOT / "configs" / f"{name}.yaml"), ["train.seq_len=32"])
    assert cfg.finetune.method == name.split("-")[1] and cfg.finetune.base_run == str(base_run)


def test_adalora_under_zero_2_and_3_matches_stage_0(tmp_path, data_dir):
    """Importance through DeepSpeed's full-gradient API: the same losses and ranks at every stage,
    the frozen base intact in each stage's checkpoint (ZeRO-3's consolidated by zero_to_fp32)."""
    from mupfast.export.load import load_run

    base_run, base = make_base_run(tmp_path)
    over = [
        "finetune.method=adalora",
        "train.steps=4",
        "finetune.init_rank=4",
        "finetune.target_rank=2",
        "finetune.tinit=1",
        "finetune.tfinal=1",
        "optim.lr=1e-2",
    ]
    out = {}
    for stage in (0, 2, 3):
        cfg = ft_config(base_run, tmp_path / f"z{stage}", data_dir, *over, f"zero.stage={stage}")
        losses = trainer.train(cfg).train_losses
        run = load_run(cfg.train.run_dir)
        state = run.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.state_dict().items()), stage
        ranks = {
            k: v for k, v in read_metrics(cfg.train.run_dir, "train")[-1].items() if k.startswith("rank/")
        }
        out[stage] = (losses, ranks)
    for stage in (2, 3):
        assert out[stage][1] == out[0][1]
        for step, loss in out[0][0].items():
            assert out[stage][0][step] == pytest.approx(loss, rel=1e-5)
