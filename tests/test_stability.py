"""Stability metrics of a run and the sweep report: spikes against the running median, the peak
grad-norm ratio, peak |logit|, and the ranking that passes over a 'lowest loss but unstable' trial."""

import optuna
import pytest

from mupfast.tuning.stability import Thresholds, judge, run_stability, running_ratios
from mupfast.tuning.sweep.report import collect, rank, report


def records(losses, grad=None, logits=None, events=()):
    """Train records (and nonfinite events) as the trainer writes them."""
    out = []
    for i, loss in enumerate(losses, 1):
        g = grad[i - 1] if grad else 1.0
        rec = {"kind": "train", "step": i, "loss": loss, "grad_norm/q": g * 0.6, "grad_norm/readout": g * 0.8}
        rec["max_abs_logit"] = logits[i - 1] if logits else 5.0
        out.append(rec)
    out += [{"kind": "event", "step": s, "nonfinite_loss": 1.0} for s in events]
    return sorted(out, key=lambda r: r["step"])


SMOOTH = [5.5 * 0.97**i + 2.0 for i in range(40)]


def test_running_ratio_is_against_the_median_of_the_previous_window():
    r = running_ratios([1.0, 2.0, 3.0, 4.0, 10.0], window=3, min_history=3)
    assert r[:3] == [None, None, None]
    assert r[3] == pytest.approx(4.0 / 2.0) and r[4] == pytest.approx(10.0 / 3.0)


def test_a_smoothly_falling_loss_is_stable():
    s = run_stability(records(SMOOTH))
    assert s["stable"] and s["loss_spikes"] == 0 and s["nonfinite_steps"] == 0
    assert s["peak_loss_ratio"] < 1.0 and s["peak_grad_ratio"] == pytest.approx(1.0)
    assert s["peak_abs_logit"] == 5.0 and s["train_records"] == 40


def test_a_loss_spike_above_the_factor_is_counted_and_makes_the_run_unstable():
    losses = list(SMOOTH)
    losses[25] *= 1.5
    losses[30] *= 1.1  # below the 1.2× factor: noise, not a spike
    s = run_stability(records(losses))
    assert s["loss_spikes"] == 1 and not s["stable"]
    assert s["peak_loss_ratio"] == pytest.approx(1.5 * SMOOTH[25] / sorted(SMOOTH[15:25])[5], rel=0.02)
    assert "1 loss spike " in s["why"]
    assert run_stability(records(losses), Thresholds(spike_factor=2.0))["stable"]


def test_an_exploding_total_grad_norm_is_unstable():
    grad = [1.0] * 40
    grad[20] = 30.0
    s = run_stability(records(SMOOTH, grad=grad))
    assert s["peak_grad_ratio"] == pytest.approx(30.0) and not s["stable"]
    assert "grad norm 30.0×" in s["why"]


def test_nonfinite_steps_are_unstable_and_peak_logit_is_judged_only_when_asked():
    s = run_stability(records(SMOOTH, events=[7, 8]))
    assert s["nonfinite_steps"] == 2 and not s["stable"]
    big = run_stability(records(SMOOTH, logits=[5.0] * 39 + [400.0]))
    assert big["peak_abs_logit"] == 400.0 and big["stable"]
    assert not judge(big, Thresholds(max_abs_logit=100.0))[0]


def _study():
    """A study of four complete trials: the lowest loss is unstable; one failed; one pruned."""
    study = optuna.create_study(study_name="s")  # in memory: the report reads only the study's API
    study.set_user_attr("space", {"lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    spiky = list(SMOOTH)
    spiky[30] *= 2
    for lr, value, losses in [
        (3e-2, 2.10, spiky),
        (1e-2, 2.20, SMOOTH),
        (3e-3, 2.30, SMOOTH),
        (1e-3, 2.5, SMOOTH),
    ]:
        stab = run_stability(records(losses))
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr}, distributions=dist, value=value, user_attrs={"stability": stab}
            )
        )
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 9e-2},
            distributions=dist,
            state=optuna.trial.TrialState.FAIL,
            user_attrs={"error": "boom"},
        )
    )
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 2e-4},
            distributions=dist,
            state=optuna.trial.TrialState.PRUNED,
            intermediate_values={50: 3.1},
            user_attrs={"stability": run_stability(records(SMOOTH))},
        )
    )
    return study


def test_rank_skips_the_unstable_lowest_loss_and_flags_it():
    rows = collect(_study())
    top, flagged = rank(rows, 2)
    assert [r.number for r in top] == [1, 2]  # by val loss, stable only
    assert [r.number for r in flagged] == [0]
    assert rows[4].why == "failed: boom" and rows[5].state == "PRUNED"


def test_report_names_the_unstable_best_and_draws_the_plot(tmp_path):
    plot = tmp_path / "report.png"
    text = report(_study(), top_k=2, plot_path=plot)
    assert "study s: 6 trials (4 complete, 1 fail, 1 pruned)" in text
    assert "! trial 0: lowest val loss but unstable (1 loss spike" in text
    assert "top 2 stable trials" in text
    assert plot.stat().st_size > 10_000
