"""The proxy sweep: space files, trial configs, and real sweeps on CPU — end to end on SQLite, with a
crashing and a pruned trial, and two worker processes sharing one study on a PostgreSQL server."""

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

import mupfast.tuning.launch as launch_module
import mupfast.tuning.sweep.sweep as sweep_module
import mupfast.tuning.trial as trial_module
from mupfast.cli import main
from mupfast.config import load_config
from mupfast.errors import ConfigError
from mupfast.rundir import read_metrics
from mupfast.tuning.space import SPACE_KEYS, load_space
from mupfast.tuning.storage import open_storage
from tests.postgres import postgres_server

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "configs" / "proxy-cpu.yaml"
STEPS = 12


def tiny(data_dir) -> list[str]:
    """Overrides that shrink configs/proxy-cpu.yaml to a few seconds of training."""
    return [
        "model.hidden_size=32",
        "model.filter_size=128",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        f"train.steps={STEPS}",
        "train.eval_every=4",
        "train.log_every=1",
        "train.eval_batches=2",
        "schedule.warmup_steps=2",
        "data.max_corpus_bytes=300000",
        f"data.dir={data_dir}",
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 3.0e-3, high: 3.0e-2}\ninit_std: {low: 0.02, high: 0.1}\n")
    return path


def test_the_default_space_file_matches_the_built_in_space():
    assert load_space(ROOT / "configs" / "sweep-space.yaml") == load_space(None)
    assert set(load_space(None)) == set(SPACE_KEYS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: {low: 1.0e-3, high: 1.0e-2}", "learning_rate: unknown hyperparameter"),
        ("lr: {low: 1.0e-2, high: 1.0e-3}", "lr: low (0.01) must be below high"),
        ("lr: {low: abc, high: 1.0e-2}", "lr.low: expected a number"),
        ("lr: {low: 0, high: 1.0e-2}", "lr.low: must be positive"),
        ("lr: {low: 1.0e-3, high: 1.0e-2, step: 2}", "lr.step: unknown field"),
        ("lr: 3.0e-3", "lr: expected {low: …, high: …, log: true}"),
        ("- lr", "expected a mapping of hyperparameters"),
    ],
)
def test_a_bad_space_file_is_a_config_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_space(path)


def test_a_hyperp_proxy_does_not_sample_what_hyperp_ignores(tmp_path):
    hyperp = load_config(PROXY, ["model.parametrization=hyperp"])
    assert set(load_space(None, hyperp)) == set(SPACE_KEYS) - {"init_std", "attention_logits_alpha"}
    assert set(load_space(None, load_config(PROXY))) == set(SPACE_KEYS)
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1.0e-3, high: 1.0e-1}\nattention_logits_alpha: {low: 0.5, high: 2}\n")
    with pytest.raises(ConfigError, match="attention_logits_alpha: hyperp does not use it"):
        load_space(path, hyperp)
    assert set(load_space(path, load_config(PROXY))) == {"lr", "attention_logits_alpha"}


def test_trial_config_sets_the_swept_keys_and_its_own_run_dir(tmp_path):
    base = load_config(PROXY)
    params = {"lr": 2e-3, "init_std": 0.03, "embeddings_scale": 4.0, "output_logits_alpha": 2.0}
    params["attention_logits_alpha"] = 0.5
    cfg = trial_module.trial_config(base, params, tmp_path / "trial-0003")
    assert cfg.optim.lr == 2e-3 and cfg.model.init_std == 0.03 and cfg.model.embeddings_scale == 4.0
    assert cfg.model.output_logits_alpha == 2.0 and cfg.model.attention_logits_alpha == 0.5
    assert cfg.train.run_dir == str(tmp_path / "trial-0003") and not cfg.train.resume
    assert not cfg.train.save_final  # metrics only, unless --keep-checkpoints
    assert trial_module.trial_config(base, params, tmp_path / "t", keep_checkpoint=True).train.save_final
    assert cfg.model.hidden_size == base.model.hidden_size and cfg.optim.beta2 == base.optim.beta2


def test_under_hyperp_the_swept_lr_is_the_base_eta0_the_transfer_rule_scales(tmp_path):
    base = load_config(PROXY, ["model.parametrization=hyperp"])
    cfg = trial_module.trial_config(base, {"lr": 0.037}, tmp_path / "trial-0000")
    assert cfg.optim.hyperp_base_lr == 0.037 and cfg.optim.lr == base.optim.lr


def test_random_draws_depend_on_the_trial_number_not_on_the_worker():
    space = load_space(None)

    def draws(seed: int, n: int) -> list[dict]:
        study = optuna.create_study(sampler=sweep_module.make_sampler("random", seed))

        def objective(t):
            return sum(t.suggest_float(k, r.low, r.high, log=r.log) for k, r in space.items())

        study.optimize(objective, n)
        return [t.params for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    a, b = draws(7, 4), draws(7, 4)
    assert a == b  # reproducible, whichever process runs trial k
    assert len({p["lr"] for p in a}) == 4
    assert draws(8, 1)[0] != a[0]


@pytest.mark.slow
def test_a_sqlite_sweep_runs_end_to_end_then_reports_and_transfers(tmp_path, data_dir, space_file, capsys):
    db = tmp_path / "sweeps" / "e2e.db"
    common = ["--study", "e2e", "--storage", f"sqlite:///{db}"]
    argv = ["sweep", "--config", str(PROXY), *common, "--trials", "3", "--space", str(space_file)]
    argv += ["--sweep-dir", str(tmp_path / "trials"), "--threads", "1", "--pruner", "none", *tiny(data_dir)]
    assert main(argv) == 0
    assert "best 3 trials so far" in capsys.readouterr().out

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t in study.trials:
        assert set(t.params) == {"lr", "init_std"}
        assert sorted(t.intermediate_values) == [4, 8, 12]  # every eval reached the pruner
        run = Path(t.user_attrs["run_dir"])
        assert run == tmp_path / "trials" / f"trial-{t.number:04d}"
        assert read_metrics(run, "eval")[-1]["val_loss"] == pytest.approx(t.value)
        written = yaml.safe_load((run / "trial.yaml").read_text())
        assert written["optim"]["lr"] == pytest.approx(t.params["lr"])
        assert not (run / "checkpoints").exists()  # removed unless --keep-checkpoints
        stab = t.user_attrs["stability"]
        assert stab["train_records"] == STEPS and stab["nonfinite_steps"] == 0
        assert stab["peak_abs_logit"] > 0
    assert study.user_attrs["proxy_config"]["model"]["hidden_size"] == 32
    assert set(study.user_attrs["space"]) == {"lr", "init_std"}

    plot = tmp_path / "report.png"
    assert main(["sweep", "--report", *common, "--top-k", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "study e2e: 3 trials (3 complete)" in out and "top 2 stable trials" in out
    assert plot.stat().st_size > 10_000

    out_dir = tmp_path / "target"
    argv = ["transfer", *common, "--top-k", "1", "--target", str(ROOT / "configs" / "target-cpu.yaml")]
    assert main([*argv, "--out", str(out_dir)]) == 0
    (written,) = out_dir.glob("*.yaml")
    best = min(study.trials, key=lambda t: t.value)
    assert written.name == f"target-cpu-top1-trial{best.number:04d}.yaml"
    cfg = load_config(written)
    assert cfg.optim.lr == best.params["lr"] and cfg.model.mup_base_hidden_size == 32
    assert "m = 8" in capsys.readouterr().out  # the target's rules table: 256 / 32


def _crash_or_train(config_path, launcher, gpus):
    if Path(config_path).parent.name == "trial-0000":  # a hard crash: the process kills itself
        return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    return REAL_COMMAND(config_path, launcher, gpus)


REAL_COMMAND = launch_module.train_command


class PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 1


def test_a_crashing_trial_fails_a_pruned_one_stops_and_the_study_goes_on(
    tmp_path, data_dir, space_file, monkeypatch
):
    monkeypatch.setattr(launch_module, "train_command", _crash_or_train)
    steps = 60  # long enough that the driver sees the first eval before the run ends
    spec = sweep_module.SweepSpec(
        load_config(PROXY, [*tiny(data_dir), f"train.steps={steps}"]),
        study_name="crash",
        storage=f"sqlite:///{tmp_path}/crash.db",
        n_trials=3,
        space=load_space(space_file),
        pruner=PruneTrialOne(),
        sweep_dir=tmp_path / "trials",
        launcher="python",
        threads=1,
        progress=False,
    )
    study = sweep_module.sweep(spec)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "PRUNED", "COMPLETE"]
    crashed, pruned, done = study.trials
    assert "killed by SIGKILL" in crashed.user_attrs["error"]
    assert list(pruned.intermediate_values) == [4]
    pruned_run = Path(pruned.user_attrs["run_dir"])
    assert not (pruned_run / "summary.json").exists()  # stopped, not left to finish
    assert max(r["step"] for r in read_metrics(pruned_run, "train")) < steps
    assert done.value == pytest.approx(read_metrics(done.user_attrs["run_dir"], "eval")[-1]["val_loss"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_sweep_processes_share_one_study_on_postgresql(tmp_path, data_dir, space_file):
    with postgres_server() as url:
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        common = ["--config", str(PROXY), "--study", "shared", "--storage", url, "--trials", "3"]
        common += ["--space", str(space_file), "--sweep-dir", str(tmp_path / "trials"), "--threads", "1"]
        common += ["--pruner", "none", *tiny(data_dir)]
        workers = [  # the second worker takes the GPU path's command: the deepspeed launcher
            subprocess.Popen(
                [sys.executable, "-m", "mupfast.cli", "sweep", *common, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=tmp_path,
            )
            for extra in (["--launcher", "python"], ["--launcher", "deepspeed", "--gpus", "0"])
        ]
        outputs = [w.communicate(timeout=540)[0] for w in workers]
        for w, out in zip(workers, outputs):
            assert w.returncode == 0, out[-3000:]
        study = optuna.load_study(study_name="shared", storage=open_storage(url))
        trials = study.trials
    numbers = [t.number for t in trials]
    assert 3 <= len(trials) <= 4  # the budget is the study's; racing workers may overshoot by one
    assert sorted(numbers) == list(range(len(trials)))  # distinct, no gaps
    errors = [t.user_attrs.get("error") for t in trials]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, errors
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials of the one study
    for t in trials:
        assert Path(t.user_attrs["run_dir"], "metrics.jsonl").is_file()


def test_tpe_models_the_results_after_its_startup_trials():
    """Optuna's TPE draws its first n_startup_trials (default 10) at random: in a study of 8 trials
    it is random search unless --startup-trials is lower."""
    import optuna

    from mupfast.tuning.sweep.sweep import make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def draws(kind, startup):
        study = optuna.create_study(sampler=make_sampler(kind, 7, startup))
        study.optimize(lambda t: (math.log10(t.suggest_float("lr", 1e-4, 1e-1, log=True)) + 2.5) ** 2, 6)
        return [t.params["lr"] for t in study.trials]

    random = draws("random", 10)
    assert draws("tpe", 10) == random  # all six are startup trials: the same per-trial draws
    modelled = draws("tpe", 2)
    assert modelled[:2] == random[:2] and modelled[2:] != random[2:]
    with pytest.raises(ConfigError, match="--startup-trials"):
        make_sampler("tpe", 7, 0)
