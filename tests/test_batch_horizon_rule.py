"""μTransfer across batch and horizon for the AdamW parametrizations: the rule's values, the optimizer
groups it gives, `mupfast transfer` with and without fitted exponents, the batch fit on synthetic
losses, and one-line errors for fit files that cannot be used."""

import json
import math

import numpy as np
import pytest

import mupfast.checks.batch_check as batch
from mupfast.config import load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.optim import base_lr, build_optimizer
from mupfast.optim.groups import base_weight_decay
from mupfast.parametrization import adamw_transfer, multipliers
from mupfast.tuning.transfer.fits import read_exponent_fit
from mupfast.tuning.transfer.values import transfer_to
from tests.helpers import tiny_config
from tests.test_transfer_config import PROXY, TARGET, make_study, transfer

MUP = [
    "model.mup_base_hidden_size=32",
    "model.mup_base_filter_size=64",
    "model.hidden_size=64",
    "model.filter_size=128",
]


def scaled(*overrides: str):
    """A μP model tuned at B0 = 4·32 tokens over T0 = 50 steps' worth, trained at another B and T."""
    return tiny_config(*MUP, "optim.lr=0.01", "optim.weight_decay=0.1", "optim.base_batch_tokens=128",
                       "optim.base_tokens=6400", *overrides)  # fmt: skip


@pytest.mark.parametrize("scaling", ["independent", "coupled"])
@pytest.mark.parametrize("world", [1, 2])
def test_the_lr_and_weight_decay_follow_the_formula_and_each_groups_decay_timescale_the_rule(scaling, world):
    cfg = scaled("train.micro_batch_size=8", "train.steps=200", f"model.weight_decay_scaling={scaling}")
    B, T, S = 8 * 32 * world, 200 * 8 * 32 * world, 200
    eta = 0.01 * (B / 128) ** 0.5 * (T / 6400) ** -0.32
    lam = 0.1 * (0.01 / eta) * ((6400 / 128) / S)
    rule = adamw_transfer(cfg, world)
    assert rule["lr"] == pytest.approx(eta, rel=1e-12) and rule["weight_decay"] == pytest.approx(
        lam, rel=1e-12
    )
    assert base_lr(cfg, world) == rule["lr"] and base_weight_decay(cfg, world) == rule["weight_decay"]
    # The decay's e-folding time in steps, 1/(lr_group · λ_group), is the same fraction of the run as at
    # the base scale for every group whose wd_mult undoes its lr_mult (independent), and for the
    # lr_mult-1 groups under coupled; coupled's hidden matrices keep their width factor m on top.
    opt = build_optimizer(
        __import__("mupfast.model", fromlist=["x"]).build_model(cfg.model), cfg, world_size=world
    )
    m = multipliers(cfg.model).m
    for g in opt.param_groups:
        if g["weight_decay"] == 0:
            continue
        fraction = 1 / (eta * g["lr_mult"] * g["weight_decay"]) / S
        base_fraction = 1 / (0.01 * g["lr_mult"] * 0.1 * g["wd_mult"]) / 50
        assert fraction == pytest.approx(base_fraction, rel=1e-9), g["name"]
        if scaling == "coupled" and g["lr_mult"] != 1:
            assert g["wd_mult"] == 1 and g["lr_mult"] == pytest.approx(1 / m)


def test_without_base_values_the_rule_leaves_the_configured_values_exactly():
    cfg = tiny_config(*MUP, "optim.lr=0.0123", "optim.weight_decay=0.07", "train.micro_batch_size=3")
    rule = adamw_transfer(cfg, 3)
    assert not rule["active"]
    assert (base_lr(cfg, 3), base_weight_decay(cfg, 3)) == (0.0123, 0.07)  # bit for bit
    at_own = with_overrides(
        cfg, {"optim.base_batch_tokens": 3 * 32 * 3, "optim.base_tokens": cfg.train.steps * 3 * 32 * 3}
    )
    assert (base_lr(at_own, 3), base_weight_decay(at_own, 3)) == (0.0123, 0.07)


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_a_target_at_the_proxys_batch_and_horizon_gets_exactly_todays_lr_and_weight_decay(parametrization):
    over = [f"model.parametrization={parametrization}", "optim.weight_decay=0.05"]
    proxy, target = load_config(PROXY, over), load_config(TARGET, over)
    t = transfer_to(proxy, {"lr": 3e-3, "init_std": 0.07}, target)
    cfg = with_overrides(target, t.values)
    assert (base_lr(cfg), base_weight_decay(cfg)) == (3e-3, 0.05)  # the trial's lr, the target's wd
    assert t.kind == "adamw"
    assert t.rule["target"]["factors"] == {"batch": 1.0, "tokens": 1.0, "lr": 1.0, "weight_decay": 1.0}


def test_hyperps_path_is_unchanged_and_carries_no_adamw_rule():
    over = ["model.parametrization=hyperp"]
    proxy, target = load_config(PROXY, over), load_config(TARGET, [*over, "train.steps=800"])
    t = transfer_to(proxy, {"lr": 2e-2}, target)
    values = t.values
    assert t.kind == "hyperp"
    assert not any(k.startswith(("optim.base_", "optim.batch_lr", "optim.horizon_lr")) for k in values)
    with pytest.raises(ConfigError, match="optim.base_batch_tokens: hyperp has its own"):
        load_config(TARGET, [*over, "optim.base_batch_tokens=4096"])


def test_transfer_to_4x_the_steps_and_2x_the_batch_writes_the_rule_and_prints_its_factors(tmp_path, capsys):
    url, proxy = make_study(tmp_path)  # proxy: 100 steps of 16 × 128 tokens, trial lr 2e-2
    assert (
        transfer(
            url, tmp_path / "out", "train.steps=400", "train.micro_batch_size=32", "optim.weight_decay=0.1"
        )
        == 0
    )
    out = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("*.yaml")
    target = load_config(path)
    o = target.optim
    assert (o.lr, o.base_batch_tokens, o.base_tokens) == (2e-2, 16 * 128, 100 * 16 * 128)
    assert (o.batch_lr_exponent, o.horizon_lr_exponent) == (0.5, 0.32)
    expected = 2e-2 * 2**0.5 * 8**-0.32  # B × 2, T × 8
    assert base_lr(target) == pytest.approx(expected, rel=1e-12)
    assert base_weight_decay(target) == pytest.approx(0.1 * (2e-2 / expected) * (100 / 400), rel=1e-12)
    header = path.read_text().split("\nmodel:")[0]
    assert "the target config's optim.horizon_lr_exponent" in header and "(B/B0)^0.5 = 1.414" in header
    assert f"lr η = lr·(B/B0)^β·(T/T0)^-α = {expected:.6g}" in out  # the summary and explain say it


def _fit_file(tmp_path, name: str, check: str, *, parametrization="mup", exponent=0.41, sigma=0.05, optima=4):
    key = "alpha" if check == "horizon-test" else "beta"
    fit = {key: exponent, "sigma": sigma, "optima": [{"log2_lr": -6.0 - 0.1 * i} for i in range(optima)]}
    path = tmp_path / name
    path.write_text(
        json.dumps({"check": check, "grid": "lr", "parametrization": parametrization, "fit": fit})
    )
    return str(path)


def test_fitted_exponents_from_result_files_replace_the_defaults_and_are_named(tmp_path, capsys):
    url, _ = make_study(tmp_path)
    h = _fit_file(tmp_path, "h.json", "horizon-test", exponent=0.21, sigma=0.04)
    b = _fit_file(tmp_path, "b.json", "batch-test", exponent=0.62, sigma=0.08)
    argv = ["--horizon-fit", h, "--batch-fit", b, "train.steps=400", "train.micro_batch_size=32"]
    assert transfer(url, tmp_path / "out", *argv) == 0
    out = capsys.readouterr().out
    target = load_config(next((tmp_path / "out").glob("*.yaml")))
    assert (target.optim.horizon_lr_exponent, target.optim.batch_lr_exponent) == (0.21, 0.62)
    assert base_lr(target) == pytest.approx(2e-2 * 2**0.62 * 8**-0.21, rel=1e-12)
    assert (
        f"α = 0.210 ± 0.040, fitted on the proxy ({h})" in out
        and f"β = 0.620 ± 0.080, fitted on the proxy ({b})" in out
    )


@pytest.mark.parametrize(
    "kind,make,message",
    [
        (
            "--horizon-fit",
            dict(check="horizon-test", parametrization="completep"),
            "measured under completep, the proxy is mup",
        ),
        ("--horizon-fit", dict(check="horizon-test", exponent=float("nan")), "the fit failed"),
        ("--batch-fit", dict(check="batch-test", optima=2), "the fit failed"),
        ("--batch-fit", dict(check="horizon-test"), "not a `mupfast batch-test` result"),
    ],
)
def test_a_fit_file_that_cannot_be_used_is_a_one_line_error_naming_it(tmp_path, capsys, kind, make, message):
    url, _ = make_study(tmp_path)
    path = _fit_file(tmp_path, "fit.json", **make)
    assert transfer(url, tmp_path / "out", kind, path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {kind}: {path}: ") and message in err and "\n" not in err
    with pytest.raises(ConfigError, match="file not found"):
        read_exponent_fit(tmp_path / "missing.json", kind, load_config(PROXY))


def synthetic(beta: float, log2_b, log2_lrs, *, seeds: int = 3, noise: float = 0.01, rng=None):
    """Losses[batch][lr][seed]: a parabola in log2 lr around log2 η* = −6 + β·(log2 B − log2 B_0)."""
    rng = rng or np.random.default_rng(0)
    out = []
    for x in log2_b:
        vertex = -6.0 + beta * (x - log2_b[0])
        offsets = rng.normal(0, noise, seeds)
        out.append(
            [
                [2.0 + 0.06 * (v - vertex) ** 2 + offsets[s] + rng.normal(0, noise) for s in range(seeds)]
                for v in log2_lrs
            ]
        )
    return out


@pytest.mark.parametrize("planted", [0.3, 0.5, 0.8])
def test_the_batch_fit_recovers_a_planted_beta_within_its_uncertainty(planted):
    log2_b = [10.0, 11.0, 12.0, 13.0]
    log2_lrs = [-8 + 0.5 * i for i in range(11)]
    fit = batch.fit_batch(synthetic(planted, log2_b, log2_lrs), log2_lrs, log2_b, n_boot=300)
    assert abs(fit["beta"] - planted) < 3 * fit["sigma"] and fit["sigma"] < 0.15
    drift = fit["drift"]
    assert drift["octaves"] == pytest.approx(planted * 3, abs=3 * fit["sigma"] * 3 + 0.1)
    assert abs(drift["after_fitted_rule"]) < abs(drift["octaves"])
    other = 0.9 if planted < 0.6 else 0.2  # a fit of another β does not reach the planted one
    wrong = batch.fit_batch(synthetic(other, log2_b, log2_lrs), log2_lrs, log2_b, n_boot=300)
    assert abs(wrong["beta"] - planted) > 3 * wrong["sigma"]


def test_batch_configs_keep_the_token_budget_the_warmup_fraction_and_the_validation_tokens():
    cfg = load_config(PROXY, ["train.steps=200", "schedule.warmup_steps=20"])
    budget = 200 * 16 * 128
    for seqs, steps in [(8, 400), (16, 200), (32, 100)]:
        c = batch.batch_config(cfg, seqs, budget)
        assert (c.train.steps, c.train.micro_batch_size, c.schedule.warmup_steps) == (
            steps,
            seqs,
            steps // 10,
        )
        assert c.train.steps * c.train.tokens_per_step() == budget
        assert c.train.eval_batches * seqs == cfg.train.eval_batches * 16
    with pytest.raises(ConfigError, match="not a whole number of steps"):
        batch.batch_config(cfg, 24, budget)


def test_explain_shows_the_rule_only_when_base_values_are_set(capsys):
    from mupfast.cli import main

    assert main(["explain", "--config", str(TARGET)]) == 0
    assert "(B/B0)" not in capsys.readouterr().out
    assert (
        main(["explain", "--config", str(TARGET), "optim.base_tokens=102400", "optim.weight_decay=0.1"]) == 0
    )
    out = capsys.readouterr().out
    assert "lr η = lr·(B/B0)^β·(T/T0)^-α = " in out and "weight decay λ = wd·(lr/η)·(S0/S)" in out
    assert f"{0.01 * 4**-0.32:.6g}" in out  # T = 4 × T0 at the same B
    assert math.isclose(
        json.loads(_json(["explain", "--json", "--config", str(TARGET), "optim.base_tokens=102400"]))[
            "transfer_rule"
        ]["factors"]["tokens"],
        4**-0.32,
    )


def _json(argv):
    import contextlib
    import io

    from mupfast.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_batch_test_and_a_weight_decay_horizon_test_run_end_to_end(tmp_path, capsys):
    import yaml

    from mupfast.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path=tmp_path).to_dict()))
    out = tmp_path / "b"
    argv = [
        "batch-test",
        "--config",
        str(path),
        "--batches",
        "2,4,8",
        "--tokens",
        "512",
        "--lrs",
        "2^-7,2^-6,2^-5",
    ]
    assert main([*argv, "--seeds", "2", "--bootstrap", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "β = " in printed and "against 0.5" in printed and "after the rule with β = 0.5" in printed
    saved = json.loads((out / "batch_test.json").read_text())
    assert (
        saved["check"] == "batch-test"
        and saved["steps"] == [8, 4, 2]
        and saved["batch_tokens"] == [64, 128, 256]
    )
    assert (out / "batch_test.png").stat().st_size > 10_000
    assert (out / "runs" / "mup" / "batch8" / "lr2^-5" / "seed1" / "summary.json").is_file()
    assert (
        read_exponent_fit(out / "batch_test.json", "--batch-fit", load_config(path))["exponent"]
        == saved["fit"]["beta"]
    )

    out = tmp_path / "h"
    argv = ["horizon-test", "--config", str(path), "--parametrization", "mup", "--grid", "weight_decay"]
    argv += ["--steps", "2,3,4", "--wds", "2^-2,2^0,2^2", "--lr", "2^-6", "--seeds", "2", "--bootstrap", "20"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "against 1: " in capsys.readouterr().out  # the timescale rule's λ* ∝ 1/T at a fixed lr
    saved = json.loads((out / "horizon_test.json").read_text())
    assert saved["grid"] == "weight_decay" and saved["fixed_lr"] == 2**-6
    run = out / "runs" / "mup" / "steps4" / "wd2^2" / "seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["weight_decay"] == 4.0
    with pytest.raises(ConfigError, match="an lr grid"):
        read_exponent_fit(out / "horizon_test.json", "--horizon-fit", load_config(path))


def test_the_end_to_end_experiments_target_points_are_the_rule_the_copy_and_a_grid_around_the_rule(tmp_path):
    """experiments/batch_horizon_transfer.py: what each target run trains with (no training here)."""
    from experiments.batch_horizon_transfer import GRID_OCTAVES, TARGET_OVERRIDES, target_points

    url, _ = make_study(tmp_path)  # proxy: 100 steps × 16 sequences, best trial lr 2e-2
    assert transfer(url, tmp_path / "out", *TARGET_OVERRIDES) == 0
    (path,) = (tmp_path / "out").glob("*.yaml")
    points = target_points(tmp_path / "runs", {"rule": path}, seeds=2)
    rule = load_config(path)
    eta, lam = base_lr(rule), base_weight_decay(rule)
    assert eta == pytest.approx(2e-2 * 2**0.5 * 16**-0.32)  # B × 2, T × 16 (800 steps × 32 against 100 × 16)
    assert set(points) == {"rule", "copy", *(f"grid{k:+g}" for k in GRID_OCTAVES)}
    assert all(len(pts) == 2 and pts[0].run_dir != pts[1].run_dir for pts in points.values())
    copy = points["copy"][0].cfg
    assert (base_lr(copy), base_weight_decay(copy)) == (2e-2, 0.1)  # the proxy's lr, the wd as written
    for k in GRID_OCTAVES:
        g = points[f"grid{k:+g}"][0].cfg
        assert base_lr(g) == pytest.approx(eta * 2**k, rel=1e-12) and base_weight_decay(g) == pytest.approx(
            lam
        )
