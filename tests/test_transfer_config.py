"""μTransfer configs from a study: the target gets the proxy's base dims and tuned values, keeps its
own regularisation, and its hidden lr multipliers are the proxy's × d_proxy/d_target exactly."""

import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mupfast.cli import main
from mupfast.config import load_config, with_overrides
from mupfast.explain import rules_table
from mupfast.parametrization import hyperp_transfer, multipliers
from mupfast.tuning.stability import run_stability
from tests.test_stability import SMOOTH, records

ROOT = Path(__file__).resolve().parents[1]
PROXY, TARGET = ROOT / "configs" / "proxy-cpu.yaml", ROOT / "configs" / "target-cpu.yaml"


def make_study(tmp_path, *, spiky_best: bool = False, proxy_overrides=()):
    """A finished sweep as `mupfast sweep` stores it: proxy config, space, trials with stability."""
    proxy = load_config(PROXY, ["schedule.warmup_steps=10", "train.steps=100", *proxy_overrides])
    url = f"sqlite:///{tmp_path}/sweep.db"
    study = optuna.create_study(storage=url, study_name="proxy")
    study.set_user_attr("proxy_config", proxy.to_dict())
    study.set_user_attr("space", {"lr": {"low": 1e-4, "high": 1e-1}, "init_std": {"low": 0.01, "high": 0.2}})
    dist = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "init_std": optuna.distributions.FloatDistribution(0.01, 0.2, log=True),
    }
    spiky = list(SMOOTH)
    spiky[30] *= 2
    for (lr, std), value, losses in [
        ((2e-2, 0.09), 2.0, spiky if spiky_best else SMOOTH),
        ((7e-3, 0.04), 2.1, SMOOTH),
        ((1e-3, 0.02), 2.4, SMOOTH),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr, "init_std": std},
                distributions=dist,
                value=value,
                user_attrs={"stability": run_stability(records(losses))},
            )
        )
    return url, proxy


def transfer(url, out, *extra):
    return main(
        ["transfer", "--storage", url, "--study", "proxy", "--target", str(TARGET), "--out", str(out), *extra]
    )


def test_target_lr_multipliers_are_the_proxys_times_the_width_ratio_and_explain_accepts_it(tmp_path, capsys):
    url, proxy = make_study(tmp_path)
    assert transfer(url, tmp_path / "out", "optim.weight_decay=0.1", "train.steps=400") == 0
    printed = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("*.yaml")
    target = load_config(path)
    assert target.model.mup_base_hidden_size == proxy.model.hidden_size == 64
    assert target.model.mup_base_filter_size == proxy.model.filter_size == 256
    assert (target.optim.lr, target.model.init_std) == (2e-2, 0.09)
    for key in ("embeddings_scale", "output_logits_alpha", "attention_logits_alpha"):
        assert getattr(target.model, key) == getattr(proxy.model, key)
    assert target.optim.weight_decay == 0.1  # regularisation: the target keeps its own
    assert target.schedule.warmup_steps == 40  # the same 10 % of training
    assert target.train.run_dir.endswith("target-cpu-trial0000")

    # The μP rules of the written target against the proxy's: hidden lr × d_proxy/d_target, exactly.
    p_rules = {r.name: r for r in rules_table(proxy.model)}
    t_rules = {r.name: r for r in rules_table(target.model)}
    width = proxy.model.hidden_size / target.model.hidden_size
    filt = proxy.model.filter_size / target.model.filter_size
    assert width == 0.25
    for name, r in t_rules.items():
        ratio = r.lr_mult / p_rules[name].lr_mult
        expected = {"q": width, "k": width, "v": width, "o": width, "ffn_in": width, "ffn_out": filt}
        assert ratio == expected.get(r.component, 1.0), name
    assert "m = 4   m_f = 4" in printed  # the target's rules table is printed

    explain = subprocess.run(
        [sys.executable, "-m", "mupfast.cli", "explain", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert explain.returncode == 0, explain.stderr
    assert "blocks.0.attn.q.weight" in explain.stdout


def test_a_proxy_with_its_own_base_keeps_that_base_so_the_ratio_is_still_the_width_ratio(tmp_path):
    url, proxy = make_study(
        tmp_path, proxy_overrides=["model.mup_base_hidden_size=32", "model.mup_base_filter_size=128"]
    )
    assert transfer(url, tmp_path / "out") == 0
    target = load_config(next((tmp_path / "out").glob("*.yaml")))
    assert target.model.mup_base_hidden_size == 32
    p_q = next(r for r in rules_table(proxy.model) if r.component == "q")
    t_q = next(r for r in rules_table(target.model) if r.component == "q")
    assert t_q.lr_mult / p_q.lr_mult == proxy.model.hidden_size / target.model.hidden_size


def test_top_k_skips_an_unstable_best_trial_and_writes_one_config_per_selected_trial(tmp_path, capsys):
    url, _ = make_study(tmp_path, spiky_best=True)
    assert transfer(url, tmp_path / "out", "--top-k", "3") == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.yaml"))
    assert names == [
        "target-cpu-top1-trial0001.yaml",
        "target-cpu-top2-trial0002.yaml",
    ]  # trial 0 is unstable
    assert load_config(tmp_path / "out" / names[0]).optim.lr == 7e-3
    assert "train the 2 configs at this (intermediate) size" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--study", "nope"], "no study 'nope'"),
        (["--top-k", "0"], "--top-k: must be positive"),
        (["--target", "missing.yaml"], "--target: config file not found"),
    ],
)
def test_bad_transfer_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    url, _ = make_study(tmp_path)
    base = {"--storage": url, "--study": "proxy", "--target": str(TARGET), "--out": str(tmp_path / "out")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    assert main(["transfer", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# HyperP: the target is rebased on the proxy and its η follows from the rule at its own B, L, T

HYPERP_PROXY = [
    "model.parametrization=hyperp",
    "model.hyperp_base_depth=3",
    "optim.hyperp_base_batch_tokens=3000",
    "optim.hyperp_base_tokens=7.5e5",
    "optim.hyperp_base_lr=0.5",  # what the sweep's lr replaces: never the transferred value
]


def test_hyperp_target_is_rebased_on_the_proxy_and_its_lr_follows_the_rule_by_hand(tmp_path, capsys):
    url, proxy = make_study(tmp_path, proxy_overrides=HYPERP_PROXY)
    # proxy-cpu: seq 128 × micro 16 = 2048 tokens/step, 100 steps (make_study), 2 layers
    assert (proxy.train.seq_len * proxy.train.micro_batch_size, proxy.train.steps) == (2048, 100)
    target_args = ["model.parametrization=hyperp", "model.num_layers=6", "train.steps=700"]
    target_args += ["train.micro_batch_size=40", "train.seq_len=96"]  # 3840 tokens/step
    assert transfer(url, tmp_path / "out", *target_args) == 0
    printed = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("*.yaml")
    target = load_config(path)

    # The proxy trained with η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32, η0 = the best trial's lr (2e-2).
    eta_proxy = 2e-2 * math.sqrt(2048 / 3000) * math.sqrt(3 / 2) * (2048 * 100 / 7.5e5) ** -0.32
    o = target.optim
    assert o.hyperp_base_lr == pytest.approx(eta_proxy, rel=1e-12)
    assert (o.hyperp_base_batch_tokens, o.hyperp_base_tokens) == (2048, 204800.0)
    assert target.model.hyperp_base_depth == 2
    # The target's η from the rule at its B = 3840, L = 6, T = 700 · 3840, by hand …
    eta_target = eta_proxy * math.sqrt(3840 / 2048) * math.sqrt(2 / 6) * (700 * 3840 / 204800) ** -0.32
    assert hyperp_transfer(target)["lr"] == pytest.approx(eta_target, rel=1e-12)
    # … which is what the proxy's own base values would have given it (the rule is a product of powers).
    unrebased = 2e-2 * math.sqrt(3840 / 3000) * math.sqrt(3 / 6) * (700 * 3840 / 7.5e5) ** -0.32
    assert eta_target == pytest.approx(unrebased, rel=1e-12)
    assert eta_target / eta_proxy == pytest.approx(0.34686, abs=1e-5)  # a real change, not a factor 1

    # The readout is μP's across the width change: logits × α_out·(proxy width / target width).
    assert target.model.mup_base_hidden_size == proxy.model.hidden_size
    assert multipliers(target.model).logit_scale == pytest.approx(
        proxy.model.output_logits_alpha * proxy.model.hidden_size / target.model.hidden_size
    )
    assert target.model.hidden_size != proxy.model.hidden_size

    for text in (printed, path.read_text()):
        assert f"proxy  η = {eta_proxy:.6g}" in text
        assert f"target η = {eta_target:.6g}" in text
        assert "√(B/B0) 1.369 × √(d0/L) 0.5774 × (T/T0)^-0.32 0.4387 = × 0.3469" in text
        assert "B=3840, L=6, T=2.688e+06" in text


def test_hyperp_target_world_size_counts_in_its_batch_and_base_batch_is_the_proxys_global(tmp_path, capsys):
    url, _ = make_study(tmp_path, proxy_overrides=HYPERP_PROXY)
    args = ["model.parametrization=hyperp", "--proxy-world-size", "2", "--target-world-size", "8"]
    assert transfer(url, tmp_path / "out", *args) == 0
    printed = capsys.readouterr().out
    target = load_config(next((tmp_path / "out").glob("*.yaml")))
    assert target.optim.hyperp_base_batch_tokens == 2 * 2048  # both of the proxy's ranks
    eta_proxy = 2e-2 * math.sqrt(4096 / 3000) * math.sqrt(3 / 2) * (4096 * 100 / 7.5e5) ** -0.32
    assert target.optim.hyperp_base_lr == pytest.approx(eta_proxy, rel=1e-12)
    # target-cpu: 2048 tokens/step per rank, 200 steps, 2 layers → at 8 ranks B = 16384, T = 200·B
    expected = eta_proxy * math.sqrt(16384 / 4096) * (200 * 16384 / (100 * 4096)) ** -0.32
    assert hyperp_transfer(target, 8)["lr"] == pytest.approx(expected, rel=1e-12)
    assert f"target η = {expected:.6g}" in printed and "world size 8" in printed


def test_hyperp_lr_does_not_transfer_to_an_adamw_target_or_back(tmp_path, capsys):
    url, _ = make_study(tmp_path, proxy_overrides=HYPERP_PROXY)
    assert transfer(url, tmp_path / "out") == 2  # target-cpu is mup
    assert "only transfers to hyperp" in capsys.readouterr().err
    (tmp_path / "mup").mkdir()
    url, _ = make_study(tmp_path / "mup")
    assert transfer(url, tmp_path / "out2", "model.parametrization=hyperp") == 2
    assert "only transfers to hyperp" in capsys.readouterr().err


def test_fixed_kv_heads_transfer_as_the_proxys_so_k_and_v_stay_output_like(tmp_path):
    from mupfast.tuning.transfer.values import transferred_values

    proxy = load_config(PROXY, ["model.num_kv_heads=1"])  # 2 heads at width 64: one kv head
    target = load_config(TARGET, ["model.num_kv_heads=1", "model.mup_base_num_kv_heads=1"])
    values = transferred_values(proxy, {"lr": 1e-2}, target)
    assert values["model.mup_base_num_kv_heads"] == 1
    assert values["model.mup_base_hidden_size"] == 64
    out = with_overrides(target, values)
    k = next(r for r in rules_table(out.model) if r.component == "k")
    assert k.init_std == pytest.approx(out.model.init_std / 4)  # m = 256 / 64, σ/m
