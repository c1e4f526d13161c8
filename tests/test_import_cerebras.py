"""`mupfast import-config cerebras`: Model Zoo configs in, the same μP model out.

The expected tables are computed here from Model Zoo's rules as its model code applies them
(gpt2_model.py: its fallbacks, μP scaling of inits and lr groups, logit and attention scales), not
from mupfast's: the import plus mupfast's rules must land on the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mupfast.cli import main
from mupfast.config import load_config
from mupfast.config.cerebras import from_model_zoo
from mupfast.config.foreign_keys import CEREBRAS_KEYS
from mupfast.config.import_config import import_config
from mupfast.errors import ConfigError
from mupfast.optim.schedules import build_schedule

FIXTURES = Path(__file__).parent / "fixtures" / "cerebras"


def _model_zoo_model(path: Path) -> tuple[dict, dict, str]:
    raw = yaml.safe_load(path.read_text())
    if "trainer" in raw:
        return raw["trainer"]["init"]["model"], raw["trainer"]["init"], "new"
    return raw["model"], raw["optimizer"], "old"


def _std(spec: dict | None, default: float | None) -> float | None:
    return default if spec is None else spec["std"]


def cerebras_table(path: Path) -> dict[str, tuple[float, float, float]]:
    """component → (init std, lr multiplier, forward multiplier) as Model Zoo's code sets them."""
    m, opt, fmt = _model_zoo_model(path)
    L, d_head = m["num_hidden_layers"], m["hidden_size"] // m["num_heads"]
    rng = m.get("initializer_range", 0.02)
    emb = (_std(m.get("embedding_initializer"), rng), 1.0, m.get("embeddings_scale", 1.0))
    if fmt == "new":  # μP by base sizes: the code scales the stds and the lr groups
        w = m["hidden_size"] / m["mup_base_hidden_size"]
        wf = m["filter_size"] / m["mup_base_filter_size"]
        attn = _std(m.get("initializer"), rng)
        ffn = _std(m.get("ffn_initializer"), attn)
        out = _std(m.get("output_layer_initializer"), rng)
        ffn_out = _std(m.get("ffn_output_layer_initializer"), rng)
        table = {
            "q": (attn / math.sqrt(w), 1 / w, 1.0),
            "o": (out / math.sqrt(w) / math.sqrt(2 * L), 1 / w, 1.0),
            "ffn_in": (ffn / math.sqrt(w), 1 / w, 1.0),
            "ffn_out": (ffn_out / math.sqrt(wf) / math.sqrt(2 * L), 1 / wf, 1.0),
        }
        logits = m.get("output_logits_alpha", 1.0) / w
    else:  # old format: the stds as written, every decoder matrix's lr × decoder_kernel
        k = opt["adjust_learning_rate"]["decoder_kernel"]
        hidden, out = m["initializer"]["std"], m["output_layer_initializer"]["std"]
        table = {
            "q": (hidden, k, 1.0),
            "o": (out, k, 1.0),
            "ffn_in": (hidden, k, 1.0),
            "ffn_out": (out, k, 1.0),
        }
        logits = m["output_logits_scale"]
    table.update(k=table["q"], v=table["q"], embedding=emb, pos_embedding=emb, bias=(0.0, 1.0, 1.0))
    table["scales"] = (m.get("attention_logits_alpha", 1.0) / d_head, logits, 1.0)
    return table


def _explain(config_path: Path, capsys) -> dict:
    assert main(["explain", "--config", str(config_path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fixture", ["gpt3_mup_new.yaml", "btlm_new.yaml", "gpt3_mup_old.yaml"])
def test_imported_table_equals_model_zoo(fixture, tmp_path, capsys):
    out = tmp_path / "imported.yaml"
    assert main(["import-config", "cerebras", str(FIXTURES / fixture), "--out", str(out)]) == 0
    capsys.readouterr()
    assert out.read_text().startswith(f"# Imported from {FIXTURES / fixture}")
    table = _explain(out, capsys)
    expected = cerebras_table(FIXTURES / fixture)
    seen = set()
    for rule in table["rules"]:
        if rule["component"] not in expected:
            assert rule["component"] in ("norm", "final_norm"), rule
            continue
        seen.add(rule["component"])
        want = expected[rule["component"]]
        got = (rule["init_std"], rule["lr_mult"], rule["forward_mult"])
        assert got == pytest.approx(want, rel=1e-12), (rule["name"], got, want)
        if rule["init"] == "normal":
            assert rule["truncation"] == pytest.approx(2.0)
    assert seen >= {"embedding", "q", "k", "v", "o", "ffn_in", "ffn_out"}
    mult = table["multipliers"]
    assert (mult["attention_scale"], mult["logit_scale"]) == pytest.approx(expected["scales"][:2], rel=1e-12)
    assert table["weight_decay_scaling"] == "coupled"  # Model Zoo's AdamW: lr × lr multiplier × wd


def _model_zoo_lr(segments: list[tuple[str, float, float, int]], t: int) -> float:
    """torch's SequentialLR of LinearLR / CosineDecayLR pieces at step t; the last value holds."""
    for kind, start, end, n in segments:
        if t < n:
            p = t / n
            return start + (end - start) * (p if kind == "linear" else 0.5 * (1 - math.cos(math.pi * p)))
        t -= n
    return segments[-1][2]


@pytest.mark.parametrize(
    "fixture, segments",
    [
        ("gpt3_mup_new.yaml", [("linear", 0.0, 0.006, 10), ("linear", 0.006, 0.0006, 40)]),
        ("btlm_new.yaml", [("linear", 0.0, 0.012, 5), ("cosine", 0.012, 0.00010198, 45)]),
        ("gpt3_mup_old.yaml", [("linear", 0.0, 0.006, 8), ("linear", 0.006, 0.0006, 32)]),
    ],
)
def test_imported_schedule_is_model_zoo_s_at_every_step(fixture, segments, tmp_path):
    text, _ = import_config("cerebras", FIXTURES / fixture)
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    fn = build_schedule(cfg.schedule, cfg.train.steps)
    assert cfg.train.steps == sum(s[3] for s in segments)
    for t in range(cfg.train.steps + 3):
        assert cfg.optim.lr * fn(t) == pytest.approx(_model_zoo_lr(segments, t), rel=1e-9, abs=1e-15), t


def test_imported_run_settings(tmp_path):
    cfg_text, notes = import_config("cerebras", FIXTURES / "btlm_new.yaml")
    raw = yaml.safe_load(cfg_text)
    assert raw["model"]["mup_base_filter_size"] == 42.75  # real-valued base sizes are kept
    assert raw["model"]["mlp"] == "swiglu" and raw["model"]["position"] == "rope"
    assert raw["clip"] == {"max_norm": 0.0, "global_max_norm": 1.0}
    assert raw["optim"]["weight_decay"] == 0.1 and raw["optim"]["beta2"] == 0.95
    assert any(n.startswith("model.position_embedding_type: 'alibi'") for n in notes)
    assert any(n.startswith("precision: cbfloat16") for n in notes)
    assert cfg_text.count("\n#   ") == len(notes)


def _with(fixture: str, **model_keys) -> dict:
    raw = yaml.safe_load((FIXTURES / fixture).read_text())
    raw["trainer"]["init"]["model"].update(model_keys)
    return raw


@pytest.mark.parametrize(
    "key, value, note",
    [
        ("dropout_rate", 0.1, "model.dropout_rate: 0.1: mupfast trains without dropout"),
        ("position_embedding_type", "alibi", "model.position_embedding_type: 'alibi': mupfast has no such"),
        ("nonlinearity", "relu", "model.nonlinearity: 'relu': the imported config uses gelu"),
        ("use_bias_in_output", True, "model.use_bias_in_output: True: the readout has no bias"),
        ("norm_type", "batchnorm", "model.norm_type: 'batchnorm': the imported config uses layernorm"),
    ],
)
def test_what_mupfast_trains_otherwise_is_one_note(key, value, note):
    notes = from_model_zoo(_with("gpt3_mup_new.yaml", **{key: value})).notes
    assert sum(n.startswith(note) for n in notes) == 1, notes


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("attention_type", "dot_product", "model.attention_type: 'dot_product'"),
        (
            "lr_adjustment_groups",
            {"embedding": {"param_filter_patterns": "*emb*"}},
            "model.lr_adjustment_groups",
        ),
        ("initializer", {"name": "xavier_uniform"}, "model.initializer"),
        ("initializer", {"name": "truncated_normal", "std": 0.08, "a": -0.1, "b": 0.16}, "not symmetric"),
    ],
)
def test_another_mup_model_is_refused_in_one_line(key, value, error):
    with pytest.raises(ConfigError) as e:
        from_model_zoo(_with("gpt3_mup_new.yaml", **{key: value}))
    assert error in str(e.value) and "\n" not in str(e.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "c.yaml"
    assert main(["import-config", "cerebras", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["import-config", "megatron", str(FIXTURES / "btlm_new.yaml"), "--out", str(out)]) == 2
    assert "unknown source 'megatron'" in capsys.readouterr().err
    out.write_text("x")
    assert main(["import-config", "cerebras", str(FIXTURES / "btlm_new.yaml"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# Model Zoo names written into a mupfast config: hints by meaning


#: Every key name of the model and optimizer sections of the four Model Zoo configs (Cerebras-GPT 111M
#: and 2.7B μP, its 40M proxy, BTLM-3B-8K), both formats, that is not a mupfast key too.
MODEL_ZOO_NAMES = [
    "name",
    "position_embedding_type",
    "share_embedding_weights",
    "max_position_embeddings",
    "num_hidden_layers",
    "dropout_rate",
    "layer_norm_epsilon",
    "attention_type",
    "attention_dropout_rate",
    "use_projection_bias_in_attention",
    "use_ffn_bias_in_attention",
    "nonlinearity",
    "use_ffn_bias",
    "embedding_initializer",
    "initializer",
    "output_layer_initializer",
    "loss_scaling",
    "loss_weight",
    "use_bias_in_output",
    "use_position_embedding",
    "mixed_precision",
    "use_bfloat16",
    "output_logits_scale",
    "optimizer_type",
    "learning_rate",
    "weight_decay_rate",
    "betas",
    "max_gradient_norm",
    "correct_bias",
    "adjust_learning_rate",
]


@pytest.mark.parametrize("name", MODEL_ZOO_NAMES)
def test_model_zoo_names_get_a_hint_of_the_same_meaning(name):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.{name}=1"])
    message = str(e.value)
    assert "did you mean" not in message  # never a guess from spelling
    assert "Cerebras Model Zoo key" in message
    ours = CEREBRAS_KEYS[name]
    assert (f"mupfast's is {ours}" in message) if ours else ("no key of that meaning" in message)


def test_a_typo_still_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"did you mean model\.hidden_size\?"):
        load_config(None, ["model.hiden_size=64"])


# ----------------------------------------------------------------------------------------------
# Truncated init


def test_truncated_init_has_the_truncated_normal_s_std():
    from mupfast.model.transformer import build_model
    from mupfast.parametrization import rules_for

    cfg = load_config(None, ["model.hidden_size=256", "model.filter_size=1024", "model.init_truncation=2.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rules = {r.name: r for r in rules_for(model, cfg.model)}
    # Truncated at ±2σ, a normal keeps a std of σ·sqrt(1 − 2·2φ(2)/(2Φ(2) − 1)) ≈ 0.8796σ.
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    factor = math.sqrt(1 - 4 * phi / (2 * big_phi - 1))
    for name in ("blocks.0.attn.q.weight", "blocks.0.mlp.up.weight", "tok_emb.weight"):
        w = dict(model.named_parameters())[name].detach().double()
        sigma = rules[name].init_std
        assert w.abs().max() <= 2 * sigma * (1 + 1e-6)
        assert w.std().item() == pytest.approx(factor * sigma, rel=0.02), name
    plain = build_model(load_config(None, ["model.hidden_size=256", "model.filter_size=1024"]).model)
    w = dict(plain.named_parameters())["blocks.0.attn.q.weight"].detach()
    assert w.std().item() == pytest.approx(rules["blocks.0.attn.q.weight"].init_std, rel=0.02)
    assert w.abs().max() > 2 * rules["blocks.0.attn.q.weight"].init_std
    assert torch.isfinite(w).all()
