"""Stability indicators (issue 10, point 5) for every parametrization: branch-output RMS and the
outlier share of the residual stream, computed on device during the training forward, and attention Z
(mean lse² of the attention logits) on both attention backends. Router Z: tests/test_moe.py."""

import pytest
import torch

from mupfast.model import build_model
from mupfast.model.indicators import outlier_share
from tests.helpers import tiny_config


def test_outlier_share_counts_elements_beyond_five_token_sigmas():
    x = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    assert outlier_share(x).item() == 0.0
    x[0, 3, 7] = 1e3  # one spike in one token: beyond 5σ even counting its own pull on μ and σ
    x[1, 5, 9] = -1e3
    assert outlier_share(x).item() == pytest.approx(2 / x.numel())


@pytest.mark.parametrize("parametrization", ["sp", "mup", "completep", "hyperp"])
def test_branch_rms_and_outlier_share_are_logged_for_every_parametrization(parametrization):
    cfg = tiny_config(f"model.parametrization={parametrization}")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    branch_ms = {"attn": [], "mlp": []}

    def record(name: str, scale: float):
        return lambda mod, inp, out: branch_ms[name].append((scale * out).square().mean().sqrt())

    for block in model.blocks:
        for name in branch_ms:
            getattr(block, name).register_forward_hook(record(name, getattr(block, f"{name}_branch_scale")))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    stats = model.stability_stats()
    for name in branch_ms:
        got = stats[f"{name}_branch_rms"]
        assert isinstance(got, torch.Tensor) and not got.requires_grad
        assert got.item() == pytest.approx(torch.stack(branch_ms[name]).mean().item(), rel=1e-5)
    assert 0.0 <= stats["outlier_share"].item() < 0.05
    assert "max_abs_logit" in stats


def _attention_z_reference(model, tokens) -> torch.Tensor:
    """Mean lse² of every block's causal attention logits, from explicit float64 scores."""
    lse_sq = []
    for block in model.blocks:
        a = block.attn
        a.register_forward_hook(lambda mod, inp, out: lse_sq.append(_lse_sq_mean_f64(mod, inp[0])))
    model(tokens[:, :-1], tokens[:, 1:])
    return torch.stack(lse_sq).mean()


def _lse_sq_mean_f64(a, x):
    B, T, _ = x.shape
    x = x.detach().double()
    q = (x @ a.q.weight.double().t()).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
    k = (x @ a.k.weight.double().t()).view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
    q, k = a.rotary(q), a.rotary(k)
    k = k.repeat_interleave(a.n_heads // a.n_kv, dim=1)
    scores = a.scale * q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.logsumexp(-1).square().mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_z_matches_a_float64_reference_on_both_backends(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    opts = ["model.num_heads=4", "model.num_kv_heads=2", f"model.attention_backend={backend}"]
    cfg = tiny_config(*opts, "model.attention_logits_alpha=8.0")  # livelier logits than at α = 1
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    expected = _attention_z_reference(model, tokens)
    got = model.stability_stats()["attn_lse_sq_mean"]
    assert not got.requires_grad
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_torch_attention_z_is_computed_only_when_the_indicators_are_read():
    torch.manual_seed(0)
    model = build_model(tiny_config("model.attention_backend=torch").model)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    attn = model.blocks[0].attn
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert attn.z.value is None and attn.z.inputs is not None  # deferred: nothing computed yet
    z = model.stability_stats()["attn_lse_sq_mean"]
    assert attn.z.inputs is None and torch.isfinite(z)  # computed once, q and k released
    model.eval()
    with torch.no_grad():
        model(tokens[:, :-1], tokens[:, 1:])
    assert attn.z.inputs is None  # evaluation and generation keep nothing
    model.train()
    model.record_indicators(False)  # what the trainer does on steps it does not log
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert attn.z.inputs is None and "attn_lse_sq_mean" not in model.stability_stats()
    model.record_indicators(True)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert model.stability_stats()["attn_lse_sq_mean"] == pytest.approx(z.item(), rel=1e-6)


def test_the_trainer_keeps_q_k_only_for_the_steps_it_logs(tmp_path, monkeypatch):
    import mupfast.train as trainer
    from mupfast.model import Transformer
    from mupfast.rundir import read_metrics

    kept_at = []
    original = Transformer.record_indicators

    def spy(self, enabled):
        kept_at.append(enabled)
        original(self, enabled)

    monkeypatch.setattr(Transformer, "record_indicators", spy)
    cfg = tiny_config(
        "model.attention_backend=torch",
        "train.steps=6",
        "train.log_every=3",
        "train.grad_accum_steps=2",
        "train.eval_every=0",
        tmp_path=tmp_path,
    )
    trainer.train(cfg)
    # Two micro-batches a step: only the last micro-batch of steps 3 and 6 keeps q and k.
    assert kept_at == [False, False] * 2 + [False, True] + [False, False] * 2 + [False, True]
    records = read_metrics(cfg.train.run_dir, "train")
    assert [r["step"] for r in records] == [3, 6] and all("attn_lse_sq_mean" in r for r in records)
