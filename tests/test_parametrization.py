"""The rules table: width scaling of every multiplier, and every parameter claimed exactly once."""

import math

import pytest
import torch
from torch import nn

from mupfast.errors import ParametrizationError
from mupfast.explain import rules_table
from mupfast.parametrization import multipliers, rules_for
from tests.helpers import tiny_config


def _by_component(rules):
    out = {}
    for r in rules:
        out.setdefault(r.component, r)
    return out


def _widths(param="mup", **kw):
    overrides = [
        f"model.parametrization={param}",
        "model.mup_base_hidden_size=32",
        "model.mup_base_filter_size=64",
    ]
    overrides += [f"model.{k}={v}" for k, v in kw.items()]
    small = tiny_config(*overrides, "model.hidden_size=32", "model.filter_size=64").model
    big = tiny_config(*overrides, "model.hidden_size=64", "model.filter_size=128").model
    return small, big


def test_doubling_width_halves_hidden_lr_and_shrinks_init_by_sqrt2():
    small, big = _widths()
    rs, rb = _by_component(rules_table(small)), _by_component(rules_table(big))
    for comp in ("q", "k", "v", "o", "ffn_in", "ffn_out"):
        assert rb[comp].lr_mult == pytest.approx(rs[comp].lr_mult / 2), comp
        assert rb[comp].init_std == pytest.approx(rs[comp].init_std / math.sqrt(2)), comp
        # independent weight decay: lr·wd stays width-invariant
        assert rb[comp].lr_mult * rb[comp].wd_mult == pytest.approx(rs[comp].lr_mult * rs[comp].wd_mult)
    for comp in ("embedding", "readout", "norm", "final_norm"):
        assert rb[comp].lr_mult == rs[comp].lr_mult == 1.0, comp
        assert rb[comp].init_std == rs[comp].init_std, comp
    assert multipliers(big).logit_scale == pytest.approx(multipliers(small).logit_scale / 2)
    assert rb["readout"].forward_mult == pytest.approx(rs["readout"].forward_mult / 2)
    assert multipliers(big).attention_scale == pytest.approx(1 / big.head_dim)


@pytest.mark.parametrize("kv", ["fixed", "growing"])
def test_k_and_v_are_output_like_when_the_kv_heads_stay_fixed(kv):
    """Fixed kv heads (Llama-style): k, v map a growing width to a fixed one, so their init scales as
    1/fan_in (σ/m) while their lr stays a matrix's (× 1/m); growing kv heads keep the hidden rule."""
    base = ["model.mup_base_hidden_size=32", "model.mup_base_filter_size=64", "model.num_heads=4"]
    for width, heads in ((32, 4), (128, 16)):
        kv_heads = 2 if kv == "fixed" else heads // 2  # 2 at every width, or 2 -> 8 with the width
        cfg = tiny_config(
            *base, f"model.num_kv_heads={kv_heads}", "model.mup_base_num_kv_heads=2",
            f"model.hidden_size={width}", f"model.filter_size={2 * width}", f"model.num_heads={heads}",
        ).model  # fmt: skip
        m, sigma = width / 32, cfg.init_std
        rules = _by_component(rules_table(cfg))
        for comp in ("k", "v"):
            want = sigma / m if (kv == "fixed" and m > 1) else sigma / math.sqrt(m)
            assert rules[comp].init_std == pytest.approx(want), (kv, width, comp)
            assert rules[comp].lr_mult == pytest.approx(1 / m), (kv, width, comp)
        assert rules["q"].init_std == pytest.approx(sigma / math.sqrt(m))
        assert multipliers(cfg).m_kv == (1.0 if kv == "fixed" else m)


def test_sp_has_no_width_scaling():
    small, big = _widths("sp", embeddings_scale=10.0, output_logits_alpha=3.0)
    rs, rb = _by_component(rules_table(small)), _by_component(rules_table(big))
    for comp in rs:
        assert rb[comp].lr_mult == rs[comp].lr_mult == 1.0
    assert rb["q"].init_std == rs["q"].init_std == small.init_std
    assert rb["o"].init_std == pytest.approx(small.init_std / math.sqrt(2 * small.num_layers))
    mult = multipliers(big)
    assert (mult.logit_scale, mult.embedding_scale) == (1.0, 1.0)
    assert mult.attention_scale == pytest.approx(1 / math.sqrt(big.head_dim))


def test_cerebras_sqrt_variants():
    _, big = _widths(scale_output_logits_by_d="false", scale_qk_dot_by_d="false", output_logits_alpha=2.0)
    mult = multipliers(big)
    assert mult.logit_scale == pytest.approx(2.0 / math.sqrt(2))
    assert mult.attention_scale == pytest.approx(1 / math.sqrt(big.head_dim))


def test_weight_decay_scaling_choices():
    for choice, expected in [("independent", 2.0), ("coupled", 1.0), ("none", 0.0)]:
        _, big = _widths(weight_decay_scaling=choice)
        r = _by_component(rules_table(big))
        assert r["q"].wd_mult == expected
        assert r["norm"].wd_mult == 0.0


def test_completep_depth_rules():
    cfg = tiny_config(
        "model.parametrization=completep",
        "model.num_layers=4",
        "model.mup_base_num_layers=2",
        "model.depth_alpha=0.5",
    ).model
    r = _by_component(rules_table(cfg))
    mult = multipliers(cfg)
    assert mult.residual_scale == pytest.approx(2**-0.5)
    assert r["q"].lr_mult == pytest.approx(2 ** (0.5 - 1))
    assert r["norm"].lr_mult == pytest.approx(2 ** (0.5 - 1))
    assert r["final_norm"].lr_mult == 1.0 and r["embedding"].lr_mult == 1.0
    assert r["o"].init_std == pytest.approx(cfg.init_std)  # no 1/√(2L) factor
    assert r["o"].forward_mult == pytest.approx(2**-0.5)


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["model.tie_embeddings=true"],
        ["model.position=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"],
        ["model.num_heads=4", "model.num_kv_heads=2", "model.mup_base_num_kv_heads=2"],
    ],
)
def test_every_parameter_claimed_once_and_initialised_from_its_rule(opts):
    from mupfast.model import build_model

    cfg = tiny_config(
        *opts,
        "model.hidden_size=128",
        "model.filter_size=256",
        "model.mup_base_hidden_size=32",
        "model.mup_base_filter_size=64",
        "model.vocab_size=512",
    ).model
    torch.manual_seed(0)
    model = build_model(cfg)
    rules = rules_for(model, cfg)
    assert sorted(r.name for r in rules) == sorted(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    for r in rules:
        p = params[r.name].detach()
        if r.init == "ones":
            assert torch.all(p == 1)
        elif r.init == "zeros":
            assert torch.all(p == 0)
        else:
            assert p.std().item() == pytest.approx(r.init_std, rel=0.1), r.name


def test_unclaimed_and_doubly_claimed_parameters_are_named():
    cfg = tiny_config().model
    from mupfast.model import build_model

    model = build_model(cfg)
    model.extra = nn.Linear(2, 2, bias=False)
    with pytest.raises(ParametrizationError, match=r"extra\.weight.*claimed by no"):
        rules_for(model, cfg)

    import mupfast.parametrization as parametrization

    model = build_model(cfg)
    patterns = parametrization._PATTERNS
    try:
        parametrization._PATTERNS = (*patterns, (r"blocks\.(\d+)\.attn\.q\.weight", "k"))
        with pytest.raises(ParametrizationError, match=r"blocks\.0\.attn\.q\.weight is claimed by several"):
            rules_for(model, cfg)
    finally:
        parametrization._PATTERNS = patterns


class _OwnRules(nn.Module):
    """A module the name patterns know nothing of, stating its parameters' rules itself."""

    def __init__(self, names=("a", "b")):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 2))
        self.b = nn.Parameter(torch.zeros(3))
        self.names = names

    def mup_rules(self, prefix, cfg):
        from mupfast.parametrization import Rule

        return [
            Rule(f"{prefix}.{n}", (3,), f"own.{n}", None, "zeros", 0.0, 2.0, 0.0, 1.0) for n in self.names
        ]


def test_a_module_that_states_its_own_rules_is_asked_and_listed_after_the_table():
    from mupfast.model import build_model
    from mupfast.parametrization import StatesOwnRules

    cfg = tiny_config().model
    model = build_model(cfg)
    base = rules_for(model, cfg)
    model.blocks[0].attn.extra = _OwnRules()
    assert isinstance(model.blocks[0].attn.extra, StatesOwnRules)
    rules = rules_for(model, cfg)
    assert rules[: len(base)] == base
    assert [(r.name, r.component) for r in rules[len(base) :]] == [
        ("blocks.0.attn.extra.a", "own.a"),
        ("blocks.0.attn.extra.b", "own.b"),
    ]
    assert rules_for(model, cfg, own_rules=False) == base
    model.blocks[0].attn.extra = _OwnRules(names=("a",))  # a parameter its rules leave out
    with pytest.raises(ParametrizationError, match=r"blocks\.0\.attn\.extra: its rules name"):
        rules_for(model, cfg)
