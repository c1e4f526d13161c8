"""μTransfer configs from a study: the target gets the proxy's base dims and tuned values, keeps its
own regularisation, and its hidden lr multipliers are the proxy's × d_proxy/d_target exactly."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mupfast.cli import main
from mupfast.config import load_config
from mupfast.parametrization import rules_table
from mupfast.stability import run_stability
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
