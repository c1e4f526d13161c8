"""``mupfast transfer-compare``: the whole verb at a tiny scale (proxy d=32 → target d=64, 12 steps,
4 proxy trials on two workers, top 2, 1 seed), its FLOPs bookkeeping, verdicts, reruns, bad flags."""

import json
import math
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from mupfast.cli import main
from mupfast.config import config_from_dict
from mupfast.errors import ConfigError
from mupfast.model.flops import flops_per_token
from mupfast.tuning.transfer_compare.proxy import trial_steps
from mupfast.tuning.transfer_compare.result import MAX_FLOPS_RATIO, MAX_TRANSFER_GAP_PCT, derive, verdicts
from mupfast.tuning.transfer_compare.spec import parse_mup_lr_grid

STEPS, TRIALS, TOP = 12, 4, 2
SP_LRS = [2**-9, 2**-8, 2**-7, 2**-6]


def tiny_args(out: Path, data: Path, space: Path, jobs: int = 2) -> list[str]:
    return [
        "transfer-compare",
        "--proxy-width=32",
        "--target-width=64",
        f"--proxy-steps={STEPS}",
        f"--trials={TRIALS}",
        f"--top={TOP}",
        "--seeds=1",
        "--sp-lrs=" + ",".join(f"2^{math.log2(lr):g}" for lr in SP_LRS),
        "--mup-lr-grid=-1,0,1",
        "--pruner=none",  # every trial runs all its steps: the FLOPs below are exact
        f"--space={space}",
        f"--jobs={jobs}",
        f"--out={out}",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.eval_every=4",
        "train.log_every=1",
        "train.eval_batches=2",
        "schedule.warmup_steps=2",
        "data.max_corpus_bytes=300000",
        f"data.dir={data}",
    ]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One tiny run of the verb: (its argv, its output directory, the JSON it wrote)."""
    root = tmp_path_factory.mktemp("compare")
    space = root / "space.yaml"  # a range where 12 steps train stably, so there are trials to transfer
    space.write_text("lr: {low: 3.0e-3, high: 3.0e-2}\ninit_std: {low: 0.02, high: 0.1}\n")
    out = root / "out"
    argv = tiny_args(out, root / "data", space)
    assert main(argv) == 0
    return argv, out, json.loads((out / "transfer_compare.json").read_text())


def _saved_config(run_dir: str | Path, name: str = "config.yaml"):
    return config_from_dict(yaml.safe_load(Path(run_dir, name).read_text()))


def _run_flops(run_dir: str | Path, name: str = "config.yaml", steps: int | None = None) -> float:
    """FLOPs of a run from the config it saved: flops_per_token × tokens per step × steps."""
    cfg = _saved_config(run_dir, name)
    steps = cfg.train.steps if steps is None else steps
    return flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.tokens_per_step() * steps


@pytest.mark.slow  # the fixture's tiny run: about a minute on 2 CPU cores
def test_the_result_has_every_path_at_the_asked_sizes(compared):
    _, out, r = compared
    assert len(r["mutransfer"]["configs"]) == TOP
    assert len(r["sp"]["grid"]) == len(SP_LRS) and sorted(e["lr"] for e in r["sp"]["grid"]) == SP_LRS
    assert r["mup_lr_grid"]["exponents"] == [-1.0, 0.0, 1.0]
    for e in [*r["mutransfer"]["configs"], *r["sp"]["grid"], *r["mup_lr_grid"]["grid"], r["mup_hand_set"]]:
        assert len(e["per_seed"]) == 1 and 1.0 < e["val_loss"] < 6.0, e
        for d in e["run_dirs"]:
            cfg = _saved_config(d)
            assert cfg.model.hidden_size == 64 and cfg.model.num_heads == 2 and cfg.train.steps == STEPS
    assert all(_saved_config(d).model.parametrization == "sp" for e in r["sp"]["grid"] for d in e["run_dirs"])
    # The transferred configs carry the proxy trials' values and the proxy's base width.
    trials = {t["number"]: t for t in r["proxy"]["trials"]}
    assert r["proxy"]["selected"] == [e["trial"] for e in r["mutransfer"]["configs"]]
    for e in r["mutransfer"]["configs"]:
        cfg = _saved_config(e["run_dirs"][0])
        assert cfg.optim.lr == trials[e["trial"]]["params"]["lr"]
        assert cfg.model.init_std == trials[e["trial"]]["params"]["init_std"]
        assert cfg.model.mup_base_hidden_size == 32
    # The proxy's trials trained at d=32 on two workers sharing one study.
    assert len(trials) >= TRIALS and all(t["state"] == "COMPLETE" for t in trials.values())
    study = optuna.load_study(study_name=r["proxy"]["study"], storage=r["proxy"]["storage"])
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert all(
        _saved_config(t.user_attrs["run_dir"], "trial.yaml").model.hidden_size == 32 for t in study.trials
    )
    # (d)'s × 2^0 point is the best transferred run itself, and the others are that config at lr × 2^±1.
    grid = {e["exponent"]: e for e in r["mup_lr_grid"]["grid"]}
    center = next(e for e in r["mutransfer"]["configs"] if e["key"] == r["mup_lr_grid"]["center"])
    assert grid[0.0]["run_dirs"] == center["run_dirs"]
    assert center["val_loss"] == min(e["val_loss"] for e in r["mutransfer"]["configs"])
    for k in (-1.0, 1.0):
        assert grid[k]["lr"] == pytest.approx(center["lr"] * 2**k, rel=1e-12)
        assert grid[k]["init_std"] == center["init_std"]
    md = (out / "transfer_compare.md").read_text()
    assert all(v["line"] in md for v in r["verdicts"])
    assert (out / "transfer_compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_flops_add_up_from_each_runs_config(compared):
    _, _, r = compared
    f = r["flops"]
    study = optuna.load_study(study_name=r["proxy"]["study"], storage=r["proxy"]["storage"])
    proxy = sum(_run_flops(t.user_attrs["run_dir"], "trial.yaml", STEPS) for t in study.trials)
    validation = sum(_run_flops(d) for e in r["mutransfer"]["configs"] for d in e["run_dirs"])
    sp = sum(_run_flops(d) for e in r["sp"]["grid"] for d in e["run_dirs"])
    assert (f["proxy"], f["validation"], f["sp"]) == (proxy, validation, sp)  # integers in floats: exact
    assert f["mutransfer"] == proxy + validation
    assert f["ratio"] == (proxy + validation) / sp
    assert f["target_runs"] == {"validation": TOP, "sp": len(SP_LRS), "mup_lr_grid_extra": 2, "hand_set": 1}
    assert f["proxy_steps_trained"] == STEPS * len(study.trials)
    # And by hand: d=32 proxy, d=64 target, 12 steps of 4×32 tokens.
    per_run = f["target_flops_per_token"] * STEPS * 4 * 32
    assert f["sp"] == len(SP_LRS) * per_run and f["validation"] == TOP * per_run
    assert f["target_flops_per_token"] > 2 * f["proxy_flops_per_token"]


@pytest.mark.slow
def test_verdict_lines_follow_from_the_numbers(compared):
    _, _, r = compared
    mut = min(e["val_loss"] for e in r["mutransfer"]["configs"])
    sp = min(e["val_loss"] for e in r["sp"]["grid"])
    grid_best = min(e["val_loss"] for e in r["mup_lr_grid"]["grid"])
    gap = 100 * (mut - grid_best) / grid_best
    assert r["best"]["mutransfer"] == mut and r["best"]["sp"] == sp
    assert r["best"]["mup_hand_set"] == r["mup_hand_set"]["val_loss"]
    assert r["transfer_gap_pct"] == pytest.approx(gap) and gap >= 0
    cost, quality = r["verdicts"]
    assert cost["loss_ok"] == (mut <= sp) and cost["flops_ok"] == (r["flops"]["ratio"] <= MAX_FLOPS_RATIO)
    assert cost["pass"] == (cost["loss_ok"] and cost["flops_ok"])
    assert quality["pass"] == (gap <= MAX_TRANSFER_GAP_PCT)
    assert cost["line"].startswith("PASS" if cost["pass"] else "FAIL")
    assert quality["line"].startswith("PASS" if quality["pass"] else "FAIL")


def test_verdicts_on_chosen_numbers():
    ok = verdicts(3.0, 3.1, 0.2, 0.4)
    assert [v["pass"] for v in ok] == [True, True]
    assert not verdicts(3.2, 3.1, 0.2, 0.4)[0]["pass"]  # worse than SP
    worse = verdicts(3.0, 3.1, 0.3, 0.6)
    assert worse[0]["loss_ok"] and not worse[0]["flops_ok"] and not worse[0]["pass"]  # too costly
    assert not worse[1]["pass"]  # 0.6% > 0.5%
    assert not verdicts(math.inf, math.inf, 0.1, None)[0]["pass"]  # all diverged: no claim holds
    assert not verdicts(math.inf, math.inf, 0.1, None)[1]["pass"]


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("summary.json")}


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_a_killed_run_is_redone_alone(compared):
    argv, out, first = compared
    before = _mtimes(out)
    assert len(before) == len(first["proxy"]["trials"]) + TOP + 1 + len(SP_LRS) + 2
    jobs1 = [a for a in argv if not a.startswith("--jobs")] + ["--jobs=1"]  # no worker pool to start
    assert main(jobs1) == 0
    assert _mtimes(out) == before  # every proxy trial and target run reused
    again = json.loads((out / "transfer_compare.json").read_text())
    assert again["best"] == first["best"] and again["flops"] == first["flops"]

    # A run killed half-way (no summary yet) is trained again; nothing else is.
    killed = Path(first["sp"]["grid"][0]["run_dirs"][0], "summary.json")
    killed.unlink()
    assert main(jobs1) == 0
    after = _mtimes(out)
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before[p]] == [str(killed)]


@pytest.mark.slow
def test_reseeds_rank_the_best_proxy_trials_by_their_mean_over_seeds(compared, tmp_path):
    """--proxy-reseeds=1 on a copy of the finished study: the best 2×top stable trials train once
    more at the next seed, the top by mean transfer, and the extra runs count as proxy FLOPs."""
    argv, out, first = compared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    moved = [a if not a.startswith("--out") else f"--out={copy}" for a in argv]
    assert main([*moved, "--proxy-reseeds=1"]) == 0
    r = json.loads((copy / "transfer_compare.json").read_text())
    trials = {t["number"]: t for t in first["proxy"]["trials"]}
    pool = sorted(trials, key=lambda n: trials[n]["value"])[: 2 * TOP]  # every tiny trial is stable
    records = {rec["trial"]: rec for rec in r["proxy"]["reseeded"]}
    assert r["proxy"]["reseeds"] == 1 and sorted(records) == sorted(pool)
    proxy_seed = _saved_config(_trial_dir(r, pool[0]), "trial.yaml").train.seed
    for n, rec in records.items():
        assert len(rec["per_seed"]) == 2 and rec["per_seed"][0] == trials[n]["value"]
        assert rec["val_loss"] == pytest.approx(sum(rec["per_seed"]) / 2)
        cfg = _saved_config(copy / "proxy-reseeds" / f"trial-{n:04d}" / "seed1")
        assert cfg.train.seed == proxy_seed + 1 and cfg.model.hidden_size == 32
        assert (
            cfg.optim.lr == trials[n]["params"]["lr"]
            and cfg.model.init_std == trials[n]["params"]["init_std"]
        )
    assert r["proxy"]["selected"] == sorted(records, key=lambda n: records[n]["val_loss"])[:TOP]
    assert [e["trial"] for e in r["mutransfer"]["configs"]] == r["proxy"]["selected"]
    per_run = _run_flops(copy / "proxy-reseeds" / f"trial-{pool[0]:04d}" / "seed1")
    assert r["flops"]["proxy_reseeds"] == len(pool) * per_run
    assert r["flops"]["proxy"] == first["flops"]["proxy"] + len(pool) * per_run
    md = (copy / "transfer_compare.md").read_text()
    assert f"{len(pool)} proxy re-seed runs" in md and "proxy val loss (mean of 2 seeds)" in md
    assert all(e["proxy_val_loss"] == records[e["trial"]]["val_loss"] for e in r["mutransfer"]["configs"])


def _trial_dir(result: dict, number: int) -> str:
    study = optuna.load_study(study_name=result["proxy"]["study"], storage=result["proxy"]["storage"])
    return next(t.user_attrs["run_dir"] for t in study.trials if t.number == number)


@pytest.mark.slow
def test_a_reseed_run_at_the_trials_own_seed_measures_the_trials_value(compared, tmp_path):
    """What the ranking averages is comparable: the re-seed runner at offset 0 retrains a trial
    and finds the val loss the sweep recorded for it."""
    _, _, r = compared
    from mupfast.tuning.launch import run_points
    from mupfast.tuning.transfer_compare.runs import seed_points
    from mupfast.tuning.trial import trial_config

    study = optuna.load_study(study_name=r["proxy"]["study"], storage=r["proxy"]["storage"])
    proxy = config_from_dict(study.user_attrs["proxy_config"])
    t = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    cfg = trial_config(proxy, t.params, tmp_path)
    pts = seed_points(cfg, tmp_path, 1, "proxy", cfg.optim.lr)
    assert run_points(pts, jobs=1, progress=False)[pts[0].run_dir] == pytest.approx(t.value, rel=1e-4)


@pytest.mark.slow
def test_the_study_refuses_a_different_proxy(compared, capsys):
    argv, _, _ = compared
    changed = [a if not a.startswith("--proxy-steps") else f"--proxy-steps={STEPS + 2}" for a in argv]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --study transfer-compare: the study was started with a different proxy")


@pytest.mark.slow
def test_extend_trains_only_the_sp_points_the_result_lacks_and_retrains_a_dropped_one_exactly(
    compared, tmp_path
):
    """--extend on the finished study, with one SP entry removed from its file and the grid widened
    by an lr and an init std: exactly the missing points train (the removed one to the loss it had,
    so the extension trains the study's own SP config), the rest are kept as they were, and FLOPs
    and verdicts are concluded again from the widened grid."""
    _, _, first = compared
    r = json.loads(json.dumps(first))
    dropped = r["sp"]["grid"].pop(0)
    kept = {e["key"]: e for e in r["sp"]["grid"]}
    source = tmp_path / "dropped.json"
    source.write_text(json.dumps(r))
    std = dropped["init_std"]
    lrs = [*SP_LRS, 2**-5]
    out = tmp_path / "extended"
    argv = ["transfer-compare", f"--extend={source}", f"--out={out}", "--jobs=2"]
    argv += ["--sp-lrs=" + ",".join(f"2^{math.log2(lr):g}" for lr in lrs), f"--sp-init-stds={std},0.1"]
    assert main(argv) == 0
    x = json.loads((out / "transfer_compare.json").read_text())

    grid = {e["key"]: e for e in x["sp"]["grid"]}
    assert sorted((e["init_std"], e["lr"]) for e in grid.values()) == sorted(
        (s, lr) for s in (std, 0.1) for lr in lrs
    )
    assert all(grid[k] == e for k, e in kept.items())  # kept, not retrained
    trained = sorted(str(p.parent) for p in out.rglob("summary.json"))
    assert len(trained) == (len(grid) - len(kept)) * r["target"]["seeds"]
    assert sorted(x["extensions"][-1]["added"]) == sorted(set(grid) - set(kept))
    md = (out / "transfer_compare.md").read_text()
    assert f"SP's grid widened by `--extend` ({len(trained)} runs: " in md and dropped["key"] in md
    again = grid[dropped["key"]]
    assert again["per_seed"] == pytest.approx(dropped["per_seed"], rel=1e-6)
    assert _saved_config(again["run_dirs"][0]).model.parametrization == "sp"
    for e in grid.values():
        cfg = _saved_config(e["run_dirs"][0])
        assert (cfg.optim.lr, cfg.model.init_std, cfg.model.hidden_size) == (e["lr"], e["init_std"], 64)
    # Concluded again: the same numbers a fresh result with this grid would give.
    f = x["flops"]
    assert f["sp"] == sum(_run_flops(d) for e in grid.values() for d in e["run_dirs"])
    assert f["ratio"] == f["mutransfer"] / f["sp"] and f["mutransfer"] == first["flops"]["mutransfer"]
    assert x["best"]["sp"] == min(e["val_loss"] for e in grid.values())
    assert x["mutransfer"] == first["mutransfer"] and x["mup_lr_grid"] == first["mup_lr_grid"]
    assert x["verdicts"] == verdicts(
        x["best"]["mutransfer"], x["best"]["sp"], f["ratio"], x["transfer_gap_pct"]
    )


COMMITTED = [  # the transfer-compare results in docs/ (why.json there is a side study's runs)
    p
    for p in sorted((Path(__file__).parents[1] / "docs/results/transfer-compare").glob("*.json"))
    if "verdicts" in json.loads(p.read_text())
]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_derive_reproduces_every_committed_results_conclusions(path):
    """The conclusions are a function of the runs: recomputed from a committed result's entries they
    are the ones it records (its bests, FLOPs totals and ratio, transfer gap, verdicts)."""
    from mupfast.checks.results import json_clean

    recorded = json.loads(path.read_text())
    again = json_clean(derive(json.loads(path.read_text())))
    for key in ("best", "flops", "transfer_gap_pct", "verdicts", "sp", "mup_lr_grid", "mutransfer"):
        assert again[key] == recorded[key], key


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trials=0"], "--trials: '0' is not a positive integer"),
        (["--trials=2", "--top=3"], "--top: 3 is more than --trials 2"),
        (["--seeds=two"], "--seeds: 'two' is not a positive integer"),
        (["--proxy-reseeds=-1"], "--proxy-reseeds: '-1' is not a non-negative integer"),
        (["--sp-lrs=2^-8"], "--sp-lrs: needs at least two"),
        (["--sp-lrs=2^-8,2^-7"], "--sp-lrs: SP gets 2 target configs, fewer than μP's 7"),
        (["--sp-init-stds=0.02,-1"], "--sp-init-stds: '-1' is not a positive number"),
        (["--mup-lr-grid=0"], "--mup-lr-grid: needs an exponent besides 0"),
        (["--mup-lr-grid=-1,x"], "--mup-lr-grid: 'x' is not a number"),
        (["--target-width=80"], "--target-width: 80 is not a multiple of the head dim 32"),
        (["--target-width=32"], "--target-width: 32 is narrower than the proxy (64)"),
        (["--proxy-steps=0"], "--proxy-steps: '0' is not a positive integer"),
        (["--sampler=grid"], "--sampler: must be random or tpe"),
        (["--pruner=asha"], "--pruner: must be median, hyperband or none"),
        (["--config=nope.yaml"], "config file not found: nope.yaml"),
        (["train.steps=50"], "train.steps: set by --proxy-steps / --target-steps"),
        (["model.hidden_size=128"], "model.hidden_size: set by --proxy-width / --target-width"),
        (["model.parametrization=sp"], "model.parametrization is sp; transfer-compare compares a mup"),
        (["--extend=missing.json"], "--extend: cannot read missing.json"),
        (["--extend=pyproject.toml"], "--extend: pyproject.toml is not JSON"),
        (["--extend=docs/results/coord-check.json"], "is not a transfer-compare result (no proxy"),
        (["--extend=x.json", "train.steps=5"], "--extend: the configs come from the result file; drop"),
        (["--extend=x.json", "--target=configs/target-cpu.yaml"], "drop --target"),
    ],
)
def test_bad_flags_are_one_line_errors_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["transfer-compare", f"--out={out}", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()  # nothing was started


def test_mup_lr_grid_always_holds_the_transferred_lr():
    assert parse_mup_lr_grid("1,-1") == [-1.0, 0.0, 1.0]
    assert parse_mup_lr_grid("-1,-0.5,0,0.5,1") == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="repeat"):
        parse_mup_lr_grid("1,1")


def test_trial_steps_counts_what_each_trial_trained(tmp_path):
    run = tmp_path / "trial"
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 3.0}) + "\n")
    states = optuna.trial.TrialState
    complete = optuna.trial.create_trial(state=states.COMPLETE, value=2.0)
    pruned = optuna.trial.create_trial(state=states.PRUNED, intermediate_values={4: 3.0, 8: 2.9})
    pruned_ran_on = optuna.trial.create_trial(
        state=states.PRUNED, intermediate_values={4: 3.0, 8: 2.9}, user_attrs={"run_dir": str(run)}
    )
    failed = optuna.trial.create_trial(state=states.FAIL, user_attrs={"run_dir": str(run)})
    lost = optuna.trial.create_trial(state=states.FAIL, user_attrs={"run_dir": str(tmp_path / "gone")})
    assert trial_steps(complete, 12) == 12
    assert trial_steps(pruned, 12) == 8  # stopped at the pruner's decision
    assert trial_steps(pruned_ran_on, 12) == 10  # trained on to step 10 while being stopped
    assert trial_steps(failed, 12) == 10 and trial_steps(failed, 6) == 6
    assert trial_steps(lost, 12) == 0
