"""The token-horizon check: its fit recovers a known exponent within the uncertainty it reports and
rejects a wrong one, on synthetic loss curves; and the CLI verb runs end to end on a tiny grid."""

import json
import math

import numpy as np
import pytest

import mupfast.checks.horizon_check as horizon
from mupfast.cli import main as cli_main
from mupfast.errors import ConfigError
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOG2_LRS = [-7 + 0.5 * i for i in range(11)]  # 2^-7 … 2^-2 in half octaves
LOG2_T = [15.0, 16.0, 17.0, 18.0]


def synthetic(alpha: float, *, seeds: int = 3, noise: float = 0.01, curvature: float = 0.06, rng=None):
    """Losses[horizon][lr][seed]: a parabola in log2 lr around log2 η* = −0.5 − α·(log2 T − 15),
    plus per-seed noise with a seed-wide offset (a lucky seed is lucky at every lr)."""
    rng = rng or np.random.default_rng(0)
    out = []
    for t in LOG2_T:
        vertex = -0.5 - alpha * (t - 15.0) - 3.0
        offsets = rng.normal(0, noise, seeds)
        out.append(
            [
                [
                    2.5 - 0.1 * (t - 15) + curvature * (x - vertex) ** 2 + offsets[s] + rng.normal(0, noise)
                    for s in range(seeds)
                ]
                for x in LOG2_LRS
            ]
        )
    return out


@pytest.mark.parametrize("vertex", [-6.3, -5.0, -4.25, -2.9])
def test_parabola_optimum_is_the_exact_vertex_of_a_noise_free_parabola(vertex):
    losses = [2.0 + 0.1 * (x - vertex) ** 2 for x in LOG2_LRS]
    o = horizon.parabola_optimum(LOG2_LRS, losses)
    assert o["fitted"] and o["log2_lr"] == pytest.approx(vertex, abs=1e-9) and not o["at_edge"]


def test_parabola_optimum_flags_the_grid_edge_and_skips_diverged_points():
    falling = [3.0 - 0.1 * i for i in range(len(LOG2_LRS))]
    o = horizon.parabola_optimum(LOG2_LRS, falling)
    assert o["at_edge"] and o["log2_lr"] == LOG2_LRS[-1]  # no upward parabola: the grid point
    curve = [2.0 + 0.1 * (x + 4.0) ** 2 for x in LOG2_LRS]
    curve[-3:] = [math.inf] * 3  # the largest lrs diverged: the fit uses the finite neighbours only
    assert horizon.parabola_optimum(LOG2_LRS, curve)["log2_lr"] == pytest.approx(-4.0, abs=1e-9)
    assert horizon.parabola_optimum(LOG2_LRS, [math.inf] * len(LOG2_LRS))["log2_lr"] is None


def test_weighted_line_is_exact_on_a_line_and_weights_pull_towards_the_precise_points():
    fit = horizon.weighted_line([1, 2, 3, 4], [5 - 0.3 * x for x in (1, 2, 3, 4)], [0.1] * 4)
    assert fit["slope"] == pytest.approx(-0.3) and fit["c"] == pytest.approx(5.0) and fit["chi2"] < 1e-20
    # One far-off point: with a large σ it barely moves the slope; with a small one it does.
    y = [0.0, -0.3, -0.6, 0.5]
    loose = horizon.weighted_line([1, 2, 3, 4], y, [0.01, 0.01, 0.01, 10.0])["slope"]
    tight = horizon.weighted_line([1, 2, 3, 4], y, [0.01, 0.01, 0.01, 0.01])["slope"]
    assert loose == pytest.approx(-0.3, abs=1e-3) and tight > 0


def test_fit_recovers_a_known_exponent_within_its_uncertainty_and_rejects_a_wrong_one():
    fit = horizon.fit_horizon(synthetic(0.45), LOG2_LRS, LOG2_T, n_boot=400, reference=0.32)
    assert 0 < fit["sigma"] < 0.15 and fit["sigma"] >= fit["sigma_boot"]
    assert abs(fit["alpha"] - 0.45) < 3 * fit["sigma"]
    assert abs(fit["z"]) > 3  # 0.32 is not what these curves were made with …
    same = horizon.fit_horizon(synthetic(0.32), LOG2_LRS, LOG2_T, n_boot=400, reference=0.32)
    assert abs(same["z"]) < 3  # … and is consistent with curves made with it
    assert len(fit["optima"]) == 4 and all(o["sigma_log2"] >= 0.05 for o in fit["optima"])
    d = fit["drift"]  # η* falls 0.45 octave per octave of T: 1.35 over the 3 octaves; the rules' residuals
    assert abs(d["octaves"] + 0.45 * 3) < 3 * d["sigma"] + 0.1
    assert (
        abs(d["after_fitted_rule"]) < 0.2
        and abs(d["after_reference_rule"] - (d["octaves"] + 0.32 * 3)) < 1e-12
    )


def test_the_reported_uncertainty_covers_the_true_exponent_about_as_often_as_it_should():
    rng = np.random.default_rng(1)
    z = [
        (f["alpha"] - 0.3) / f["sigma"]
        for f in (
            horizon.fit_horizon(synthetic(0.3, rng=rng), LOG2_LRS, LOG2_T, n_boot=150, seed=k)
            for k in range(16)
        )
    ]
    assert sum(abs(v) < 2 for v in z) >= 13  # ≥ 80 % inside 2σ (a Gaussian gives 95 %)
    assert np.std(z) > 0.2  # and σ is not absurdly inflated


def test_fewer_than_three_horizons_cannot_fit_an_exponent():
    with pytest.raises(ConfigError, match="at least 3 horizons"):
        horizon.fit_horizon(synthetic(0.3)[:2], LOG2_LRS, LOG2_T[:2])


@pytest.mark.parametrize("parametrization", ["hyperp", "mup"])
def test_horizon_points_train_at_the_grid_lr_with_the_warmup_a_fixed_fraction(tmp_path, parametrization):
    """Whatever base values the config names, a grid point trains at the lr it is named for."""
    from mupfast.checks.scale_grid import ScaleGrid, point_config
    from mupfast.optim import base_lr

    base = ["optim.base_tokens=123456"] if parametrization == "mup" else []
    cfg = tiny_config("train.steps=20", "schedule.warmup_steps=4", *base, tmp_path=tmp_path)
    g = ScaleGrid("steps", [10, 40], "lr", [2**-5, 2**-4.5], 2, parametrization)
    for steps in g.scales:
        for lr in g.values:
            c = point_config(horizon.horizon_config(cfg, steps), g, lr, None)
            assert c.train.steps == steps and c.schedule.warmup_steps == steps // 5
            assert base_lr(c) == pytest.approx(lr, rel=1e-12)  # every factor of the rule is 1


def test_cli_smoke_run_writes_json_and_png_and_bad_flags_are_one_line_errors(tmp_path, capsys):
    cfg = tiny_config(tmp_path=tmp_path)
    path = tmp_path / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "h"
    argv = ["horizon-test", "--config", str(path), "--steps", "1,2,3", "--lrs", "2^-7,2^-5"]
    argv += ["--seeds", "2", "--bootstrap", "20", "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "α = " in printed and "against 0.32" in printed
    saved = json.loads((out / "horizon_test.json").read_text())
    assert saved["horizons_steps"] == [1, 2, 3] and len(saved["val_loss"]) == 3
    assert saved["base_config"]["model"]["hidden_size"] == cfg.model.hidden_size  # reproducible from the JSON
    assert all(len(curve) == 2 and all(len(v) == 2 for v in curve) for curve in saved["val_loss"])
    assert (out / "horizon_test.png").stat().st_size > 10_000
    assert (out / "runs" / "hyperp" / "steps3" / "lr2^-5" / "seed1" / "summary.json").is_file()

    for args, message in [
        (["--steps", "1,2"], "at least 3 horizons"),
        (["--lrs", "2^-5"], "--lrs: needs at least two"),
        (["--parametrization", "muon"], "--parametrization"),
    ]:
        assert cli_main(["horizon-test", "--config", str(path), "--out", str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
