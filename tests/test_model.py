"""The transformer: options, the μP forward multipliers, and μP ≡ SP at the base width."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mupfast.explain import rules_table
from mupfast.model import build_model
from mupfast.optim import build_optimizer
from mupfast.parametrization import multipliers
from tests.helpers import tiny_config

MOE = ["model.moe_experts=4", "model.moe_top_k=2"]


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["model.tie_embeddings=true", "model.position=learned"],
        ["model.norm=layernorm", "model.mlp=gelu", "model.bias=true"],
        ["model.num_heads=4", "model.num_kv_heads=1", "model.mup_base_num_kv_heads=1"],
        ["model.parametrization=completep", "model.mup_base_num_layers=1"],
    ],
)
def test_forward_options_give_float32_logits_and_matching_loss(opts):
    cfg = tiny_config(*opts, "model.mup_base_hidden_size=16", "model.mup_base_filter_size=32").model
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    targets = torch.randint(0, cfg.vocab_size, (3, 17))
    targets[0, :5] = -100
    logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab_size) and logits.dtype == torch.float32
    loss = model(tokens, targets)
    expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_logits_carry_the_output_multiplier():
    cfg = tiny_config(
        "model.hidden_size=64",
        "model.mup_base_hidden_size=16",
        "model.mup_base_filter_size=64",
        "model.output_logits_alpha=3.0",
    ).model
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    h = model.hidden(tokens)
    raw = h @ model.readout.weight.t()
    assert multipliers(cfg).logit_scale == pytest.approx(3.0 / 4)
    torch.testing.assert_close(model(tokens), raw * 0.75)


PARAMETRIZATIONS = ["sp", "mup", "completep", "hyperp"]


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("moe", [False, True])
def test_every_forward_multiplier_the_model_uses_is_its_rules(parametrization, moe):
    opts = ["model.hidden_size=64", "model.mup_base_hidden_size=16", "model.mup_base_filter_size=32"]
    opts += ["model.embeddings_scale=3.0", "model.output_logits_alpha=2.0", "model.mup_base_num_layers=1"]
    cfg = tiny_config(f"model.parametrization={parametrization}", *opts, *(MOE if moe else [])).model
    model = build_model(cfg)
    rules = {r.name: r for r in rules_table(cfg)}
    assert (
        model.embedding_scale
        == rules["tok_emb.weight"].forward_mult
        == (1.0 if parametrization == "sp" else 3.0)
    )
    assert model.readout.logit_scale == rules["readout.weight"].forward_mult == multipliers(cfg).logit_scale
    assert model.readout.logit_scale != 1.0 or parametrization == "sp"  # SP: no width multiplier
    for i, block in enumerate(model.blocks):
        assert block.attn_branch_scale == rules[f"blocks.{i}.attn.o.weight"].forward_mult
        down = f"blocks.{i}.mlp.experts.0.down.weight" if moe else f"blocks.{i}.mlp.down.weight"
        assert block.mlp_branch_scale == rules[down].forward_mult
        if moe:
            assert block.mlp.router_scale == rules[f"blocks.{i}.mlp.router.weight"].forward_mult


def test_editing_a_rule_changes_the_model(monkeypatch):
    """The model takes its multipliers from the table: a rule that silences the attention branch
    gives the function of the same weights with W_o zeroed."""
    import mupfast.parametrization as parametrization

    cfg = tiny_config(
        "model.hidden_size=64", "model.mup_base_hidden_size=16", "model.mup_base_filter_size=64"
    ).model
    original = parametrization._rule

    def silenced(cfg, mult, name, shape, component, layer):
        rule = original(cfg, mult, name, shape, component, layer)
        return dataclasses.replace(rule, forward_mult=0.0) if component == "o" else rule

    torch.manual_seed(0)
    plain = build_model(cfg)
    monkeypatch.setattr(parametrization, "_rule", silenced)
    edited = build_model(cfg)
    edited.load_state_dict(plain.state_dict())
    assert all(b.attn_branch_scale == 0.0 for b in edited.blocks)
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.o.weight.zero_()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(edited(tokens), plain(tokens))


def test_attention_uses_alpha_over_d_head():
    cfg = tiny_config("model.attention_logits_alpha=2.0").model
    model = build_model(cfg)
    assert model.blocks[0].attn.scale == pytest.approx(2.0 / cfg.head_dim)


def test_causality():
    cfg = tiny_config().model
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def _train_losses(*overrides: str, steps: int = 6) -> list[float]:
    """Losses of a few clip+AdamW steps on one fixed batch (so the loss must fall)."""
    cfg = tiny_config(
        "model.mup_base_hidden_size=32",
        "model.mup_base_filter_size=64",
        "optim.lr=1e-2",
        "optim.weight_decay=0.1",
        *overrides,
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mup_equals_sp_at_base_width():
    # m = 1, α_attn = √d_head (so α/d = 1/√d), embedding and logit multipliers 1
    base = [
        "model.hidden_size=32",
        f"model.attention_logits_alpha={math.sqrt(16)}",
        "model.embeddings_scale=1.0",
        "model.output_logits_alpha=1.0",
    ]
    sp = _train_losses("model.parametrization=sp", *base)
    mup = _train_losses("model.parametrization=mup", *base)
    assert sp[-1] < sp[0] - 0.5  # it trains
    assert mup == pytest.approx(sp, rel=1e-6, abs=1e-7)
    # and the comparison can fail: another logit multiplier changes the losses
    other = _train_losses("model.parametrization=mup", *base[:-1], "model.output_logits_alpha=2.0")
    assert other[1:] != pytest.approx(sp[1:], rel=1e-3)


def test_triton_backends_match_the_torch_backends():
    """The model through the Triton kernels (interpreter on CPU) equals the torch path: loss and grads."""
    pytest.importorskip("triton")
    from mupfast.kernels.runtime import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    opts = [
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.mup_base_hidden_size=16",
        "model.mup_base_filter_size=64",
        "model.mup_base_num_kv_heads=1",
        "model.max_seq_len=24",
        "train.seq_len=24",
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = build_model(tiny_config(*opts).model, device=device)
    fast = build_model(
        tiny_config(*opts, "model.attention_backend=triton", "model.readout_backend=triton").model,
        device=device,
    )
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 256, (2, 21), device=device)
    losses = []
    for m in (ref, fast):
        loss = m(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert "attn_lse_sq_mean" in fast.stability_stats() and "max_abs_logit" in fast.stability_stats()


def test_changed_forward_multipliers_apply_at_the_next_forward():
    """PBT's explore changes embeddings_scale, output_logits_alpha and attention_logits_alpha of a built
    model: its next forward equals a model built with those values and the same weights."""
    cfg = tiny_config(
        "model.hidden_size=64", "model.mup_base_hidden_size=16", "model.mup_base_filter_size=32"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    before = model(tokens)
    values = dict(embeddings_scale=3.0, output_logits_alpha=0.5, attention_logits_alpha=2.0)
    model.set_multipliers(**values)
    fresh = build_model(dataclasses.replace(cfg.model, **values))
    fresh.load_state_dict(model.state_dict())
    after = model(tokens)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_std"):
        model.set_multipliers(init_std=0.1)
