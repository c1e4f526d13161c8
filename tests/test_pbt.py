"""Population-based training: the plan, the shared study (claims, takeover, resume), failures, the
report and ``transfer --pbt`` — driven by a stand-in trainer that starts in milliseconds — and, in
the slow tests, real training segments whose exploit must copy weights, optimizer state and values.
"""

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

import mupfast.tuning.launch as launch_module
import mupfast.tuning.pbt.pbt as pbt_module
from mupfast.cli import main
from mupfast.config import load_config
from mupfast.errors import ConfigError
from mupfast.tuning.pbt.plan import check_settings, explore, make_plan, quantile_size
from mupfast.tuning.pbt.schema import Segment
from mupfast.tuning.space import Range, parse_space

ROOT = Path(__file__).resolve().parents[1]
PROXY = ROOT / "configs" / "proxy-cpu.yaml"
TARGET = ROOT / "configs" / "target-cpu.yaml"

#: A stand-in for ``mupfast train`` that honours the segment protocol: it resumes from the member's
#: ``latest`` checkpoint (a JSON state), "trains" to train.stop_at, appends train and eval records to
#: metrics.jsonl and saves a checkpoint tag. Its val loss grows with |log(lr / 0.01)| per step, so the
#: members nearest lr = 0.01 win. lr > 0.3 crashes, lr > 0.15 gives a NaN val loss. A lock file makes
#: two runs of one member at the same time fail loudly.
FAKE_TRAINER = r"""
import json, math, os, signal, sys, time
import yaml

signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
cfg = yaml.safe_load(open(sys.argv[1]))
t = cfg["train"]
run, stop, lr = t["run_dir"], t["stop_at"] or t["steps"], cfg["optim"]["lr"]
ck = os.path.join(run, "checkpoints")
state, start = 0.0, 0
if t["resume"] and os.path.isfile(os.path.join(ck, "latest")):
    tag = open(os.path.join(ck, "latest")).read().strip()
    saved = json.load(open(os.path.join(ck, tag, "state.json")))
    state, start = saved["state"], saved["step"]
lock = os.path.join(run, "running.lock")
fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
try:
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0.02")))
    if lr > 0.3:
        print("error: boom (lr too high for the stand-in)")
        sys.exit(3)
    records = []
    for step in range(start + 1, stop + 1):
        state += abs(math.log(lr / 0.01)) + 0.01
        records.append({"kind": "train", "step": step, "loss": 3.0 + state})
    val = float("nan") if lr > 0.15 else 2.0 + state
    records.append({"kind": "eval", "step": stop, "val_loss": val})
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    tag = f"step{stop:08d}"
    os.makedirs(os.path.join(ck, tag), exist_ok=True)
    json.dump({"state": state, "step": stop, "lr": lr}, open(os.path.join(ck, tag, "state.json"), "w"))
    open(os.path.join(ck, "latest"), "w").write(tag)
finally:
    os.close(fd)
    os.unlink(lock)
"""

#: Runs ``mupfast`` with the stand-in trainer (a driver in its own process, to be killed).
DRIVER = r"""
import sys
sys.path.insert(0, {root!r})
import mupfast.tuning.launch as m
m.train_command = lambda config_path, launcher, gpus: [sys.executable, {fake!r}, str(config_path)]
from mupfast.cli import main
sys.exit(main(sys.argv[1:]))
"""

SPACE = "lr: {low: 1.0e-3, high: 1.0e-1}\nembeddings_scale: {low: 1.0, high: 30.0}\n"


def tiny(tmp_path) -> list[str]:
    return [
        "model.hidden_size=32",
        "model.filter_size=64",
        "model.max_seq_len=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.eval_batches=2",
        "schedule.warmup_steps=2",
        "data.max_corpus_bytes=300000",
        f"data.dir={tmp_path}/data",
    ]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The stand-in trainer in place of ``mupfast train`` for in-process drivers; its script path."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(
        launch_module, "train_command", lambda cfg, launcher, gpus: [sys.executable, str(script), str(cfg)]
    )
    return script


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def run_pbt(tmp_path, *, study="s", population=4, interval=2, steps=6, lines=None, **kw):
    cfg = load_config(PROXY, tiny(tmp_path))
    spec = pbt_module.PbtSpec(
        cfg,
        study=study,
        storage=f"sqlite:///{tmp_path}/pbt.db",
        population=population,
        interval=interval,
        steps=steps,
        space=kw.pop("space", parse_space(yaml.safe_load(SPACE))),
        seed=kw.pop("seed", 7),
        pbt_dir=tmp_path / "members",
        launcher="python",
        say=(lines.append if lines is not None else lambda s: None),
        **kw,
    )
    return pbt_module.pbt(spec)


def seg(member, val, status="ok", generation=0, lr=0.01):
    return Segment(
        member, generation, 2, {"lr": lr, "embeddings_scale": 2.0}, val, status, None, member, None, 0
    )


SETTINGS = {"population": 4, "interval": 2, "steps": 6, "generations": 3, "quantile": 0.25}
SETTINGS.update(perturb=1.2, resample_p=0.25, seed=3)


# ----------------------------------------------------------------------------------------------
# The plan


def test_the_bottom_quantile_and_every_failed_member_copy_a_top_member():
    segs = [
        seg(0, 3.0),
        seg(1, 2.0),
        seg(2, None, "crash"),
        seg(3, 2.5),
        seg(4, 2.2),
        seg(5, None, "nonfinite"),
    ]
    plan = make_plan(segs, {**SETTINGS, "population": 6}, parse_space(yaml.safe_load(SPACE)))
    assert plan["ranking"] == [1, 4, 3, 0, 2, 5]  # failed ones last
    assert quantile_size(6, 0.25) == 2
    moves = {mv["member"]: mv for mv in plan["moves"]}
    assert set(moves) == {2, 5}  # the bottom two are the failed two
    assert all(mv["source"] in (1, 4) for mv in moves.values())
    assert moves[2]["why"] == "crash" and moves[5]["why"] == "nonfinite"
    assert plan["failed"] == {"2": "crash", "5": "nonfinite"}


def test_explore_multiplies_or_divides_by_perturb_resamples_and_stays_in_the_space():
    space = {"lr": Range(1e-3, 1e-1), "embeddings_scale": Range(1.0, 30.0)}
    seen = set()
    for i in range(200):
        new, how = explore(
            {"lr": 0.0011, "embeddings_scale": 5.0}, space, random.Random(i), perturb=1.2, resample_p=0.25
        )
        seen |= set(how.values())
        assert 1e-3 <= new["lr"] <= 1e-1 and 1.0 <= new["embeddings_scale"] <= 30.0
        if how["lr"] == "÷1.2":
            assert new["lr"] == 1e-3  # clipped to the space
        if how["embeddings_scale"] == "×1.2":
            assert new["embeddings_scale"] == pytest.approx(6.0)
    assert seen == {"×1.2", "÷1.2", "resample"}
    same, how = explore({"lr": 0.02}, space, random.Random(0), perturb=1.0, resample_p=0.0)
    assert same == {"lr": 0.02} and how == {"lr": "kept"}


def test_a_plan_is_the_same_whichever_worker_computes_it():
    segs = [seg(i, 2.0 + 0.1 * i) for i in range(4)]
    space = parse_space(yaml.safe_load(SPACE))
    assert make_plan(segs, SETTINGS, space) == make_plan(list(reversed(segs)), SETTINGS, space)
    plans = {json.dumps(make_plan(segs, {**SETTINGS, "seed": k}, space)) for k in range(6)}
    assert len(plans) > 1  # the study seed drives explore


@pytest.mark.parametrize(
    "change, message",
    [
        ({"population": 1}, "--population: must be at least 2"),
        ({"interval": 4}, "--interval: 4 does not divide --steps 6"),
        ({"interval": 12}, "--interval: 12 is larger than --steps 6"),
        ({"interval": 0}, "--interval: must be positive"),
        ({"quantile": 0.6}, r"--quantile: must be in \(0, 0.5\]"),
        ({"quantile": 0.0}, r"--quantile: must be in \(0, 0.5\]"),
        ({"perturb": 0.8}, "--perturb: must be at least 1"),
        ({"resample_p": 1.5}, r"--resample-p: must be in \[0, 1\]"),
    ],
)
def test_bad_settings_are_one_line_config_errors(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_settings({**SETTINGS, **change})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"jobs": 0}, "--jobs: must be positive"),
        ({"grace_s": 0.0}, "--claim-grace: must be positive"),
        ({"timeout_s": -1.0}, "--segment-timeout: must be positive"),
        ({"population": 1}, "--population: must be at least 2"),
    ],
)
def test_bad_driver_flags_are_config_errors_before_anything_runs(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        run_pbt(tmp_path, **kw)
    assert not (tmp_path / "members").exists()


def test_a_second_worker_with_other_settings_is_refused(tmp_path, fake):
    run_pbt(tmp_path, population=2, interval=2, steps=4)
    with pytest.raises(
        ConfigError, match=r"different settings; it differs at population \(2 there, 3 here\)"
    ):
        run_pbt(tmp_path, population=3, interval=2, steps=4)
    with pytest.raises(ConfigError, match="different proxy config; it differs at model.hidden_size"):
        cfg = load_config(PROXY, [*tiny(tmp_path), "model.hidden_size=64"])
        pbt_module.pbt(
            pbt_module.PbtSpec(
                cfg, study="s", storage=f"sqlite:///{tmp_path}/pbt.db", population=2, interval=2, steps=4
            )
        )
    with pytest.raises(ConfigError, match="--seed: the study s was started with seed 7"):
        run_pbt(tmp_path, population=2, interval=2, steps=4, seed=8)


def test_init_std_cannot_be_explored(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1.0e-3, high: 1.0e-1}\ninit_std: {low: 0.01, high: 0.1}\n")
    cfg = load_config(PROXY)
    with pytest.raises(ConfigError, match="init_std: cannot change mid-run"):
        pbt_module.pbt_space(str(path), cfg)
    notes = []
    assert "init_std" not in pbt_module.pbt_space(None, cfg, notes.append)
    assert "init_std" in notes[0] and "0.05" in notes[0]
    assert main(["pbt", "--config", str(PROXY), "--study", "x", "--interval", "5", "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "init_std" in err and "\n" not in err


def test_the_cli_names_what_is_missing(tmp_path, capsys):
    assert main(["pbt", "--config", str(PROXY), "--study", "x"]) == 2
    assert "--interval K" in capsys.readouterr().err
    argv = ["pbt", "--config", str(PROXY), "--study", "x", "--interval", "7", "--storage", f"{tmp_path}/x.db"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: --interval: 7 does not divide --steps 200 (generations must end on the same step)"
    assert main(["pbt", "--report", "--study", "none", "--storage", f"sqlite:///{tmp_path}/no.db"]) == 2
    assert "no PBT database" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Whole studies with the stand-in trainer


def test_a_study_runs_every_generation_exploits_and_reports(tmp_path, fake):
    lines = []
    store = run_pbt(tmp_path, lines=lines)
    segs = store.segments()
    assert sorted((s.generation, s.member) for s in segs) == [(g, m) for g in range(3) for m in range(4)]
    assert all(s.status == "ok" for s in segs) and store.generation() == 3
    assert sum(ln.startswith("member ") for ln in lines) == 12  # one line per finished segment
    assert sum(ln.startswith("generation ") for ln in lines) == 3
    exploits = [e for e in store.events() if e["kind"] == "exploit"]
    assert len(exploits) == 2  # one bottom member per generation but the last
    for e in exploits:
        target = next(s for s in segs if s.member == e["member"] and s.generation == e["generation"] + 1)
        source = next(s for s in segs if s.member == e["source"] and s.generation == e["generation"])
        assert target.weights_from == e["source"]
        explored = next(x for x in store.events() if x["kind"] == "explore" and x["id"] == e["id"] + 1)
        assert explored["old"] == source.hparams and explored["new"] == target.hparams
    for m in range(4):  # only the newest checkpoint tag of each member is kept
        ckpt = tmp_path / "members" / f"member-{m:02d}" / "checkpoints"
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000006"]


def first_train_loss_after(run_dir: Path, step: int) -> float:
    """The train loss of ``step + 1`` as last logged (a re-run segment appends again)."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train" and r["step"] == step + 1][-1]


def test_exploit_without_perturbation_continues_the_source_exactly(tmp_path, fake):
    store = run_pbt(tmp_path, population=2, quantile=0.5, perturb=1.0, resample_p=0.0)
    exploits = [e for e in store.events() if e["kind"] == "exploit"]
    assert len(exploits) == 2
    for e in exploits:
        k = e["step"]
        src, dst = (tmp_path / "members" / f"member-{m:02d}" for m in (e["source"], e["member"]))
        assert first_train_loss_after(dst, k) == first_train_loss_after(src, k)
        target = next(s for s in store.segments(e["generation"] + 1) if s.member == e["member"])
        source = next(s for s in store.segments(e["generation"]) if s.member == e["source"])
        assert target.hparams == source.hparams == e["new"]


def test_crashed_and_nonfinite_members_are_replaced_and_counted(tmp_path, fake, monkeypatch, capsys):
    first = [{"lr": 0.5, "embeddings_scale": 2.0}, {"lr": 0.2, "embeddings_scale": 2.0}]  # crash, NaN
    first += [{"lr": 0.012, "embeddings_scale": 2.0}, {"lr": 0.03, "embeddings_scale": 2.0}]
    monkeypatch.setattr(pbt_module, "initial_hparams", lambda space, seed, n: first)
    lines = []
    store = run_pbt(tmp_path, lines=lines)
    gen0 = {s.member: s for s in store.segments(0)}
    assert gen0[0].status == "crash" and "exit code 3" in gen0[0].reason and "boom" in gen0[0].reason
    assert gen0[1].status == "nonfinite" and gen0[1].val_loss is None
    moves = {e["member"]: e for e in store.events() if e["kind"] == "exploit" and e["generation"] == 0}
    assert set(moves) >= {0, 1} and all(mv["source"] == 2 for mv in moves.values())  # the best one
    assert all(s.status == "ok" for s in store.segments(1))  # replaced: they train on from member 2
    kinds = [e["kind"] for e in store.events()]
    assert kinds.count("crash") == 1 and kinds.count("nonfinite") == 1
    assert any("CRASH: exit code 3" in ln for ln in lines) and any("NONFINITE" in ln for ln in lines)

    assert (
        main(
            [
                "pbt",
                "--report",
                "--study",
                "s",
                "--storage",
                f"sqlite:///{tmp_path}/pbt.db",
                "--report-dir",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 crash, 1 nonfinite" in out
    table = (tmp_path / "report" / "generations.md").read_text()
    assert "| 0 | 2 |" in table and table.count("\n| ") == 3 + 1  # header + three generations
    assert (tmp_path / "report" / "val-loss.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "lineage.png").stat().st_size > 10_000
    lin = json.loads((tmp_path / "report" / "lineage.json").read_text())
    assert lin["events"]["exploit"] == kinds.count("exploit") == lin["events"]["explore"]
    assert lin["events"]["crash"] == 1 and lin["events"]["nonfinite"] == 1 and lin["complete"]


def test_the_lineage_follows_the_weights_back_to_generation_zero(tmp_path, fake):
    from mupfast.tuning.pbt.report import lineage

    store = run_pbt(tmp_path, population=4, interval=1, steps=4, jobs=2)  # two worker threads
    assert {s.worker.rsplit(":", 1)[1] for s in store.segments()} == {"0", "1"}
    lin = lineage(store)
    entries = lin["lineage"]
    assert [e["generation"] for e in entries] == [0, 1, 2, 3]
    by_key = {(s.member, s.generation): s for s in store.segments()}
    for a, b in zip(entries, entries[1:]):
        assert by_key[(b["member"], b["generation"])].weights_from == a["member"]
    last = [s for s in store.segments(3) if s.status == "ok"]
    assert entries[-1]["member"] == min(last, key=lambda s: s.val_loss).member == lin["best_member"]
    lr0 = entries[0]["hparams"]["lr"]
    assert lin["piecewise"] == [[g / 4, e["hparams"]["lr"] / lr0] for g, e in enumerate(entries)]


def test_transfer_pbt_writes_the_lineage_lr_schedule_as_fractions_of_the_target_run(tmp_path, fake, capsys):
    from mupfast.tuning.pbt.report import lineage

    store = run_pbt(tmp_path, population=4, interval=2, steps=8)
    lin = lineage(store)
    out = tmp_path / "target.yaml"
    argv = ["transfer", "--pbt", "s", "--storage", f"sqlite:///{tmp_path}/pbt.db", "--target", str(TARGET)]
    assert main([*argv, "--out", str(out), "train.steps=400"]) == 0
    assert "piecewise multipliers" in capsys.readouterr().out
    cfg = load_config(out)
    entries = lin["lineage"]
    lrs = [e["hparams"]["lr"] for e in entries]
    assert cfg.optim.lr == lrs[0]  # the first lr; μP's lr_mult scales it at the target's width
    assert cfg.schedule.piecewise == [[g * 2 / 8, lr / lrs[0]] for g, lr in enumerate(lrs)]
    assert cfg.model.embeddings_scale == entries[-1]["hparams"]["embeddings_scale"]  # the final value
    assert cfg.model.mup_base_hidden_size == 32 and cfg.model.hidden_size == 256
    assert cfg.train.steps == 400 and cfg.schedule.warmup_steps == round(2 * 400 / 8)  # rescaled
    from mupfast.optim.schedules import piecewise_starts

    starts = [s for s, _ in piecewise_starts(cfg.schedule.piecewise, cfg.train.steps)]
    assert starts == [0, 100, 200, 300]  # generation g of the proxy's 8 steps → step g·100 of 400
    text = out.read_text()
    assert "FINAL values" in text and "embeddings_scale" in text.split("FINAL")[0].splitlines()[-1]
    assert main([*argv, "--study", "x"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_transfer_pbt_refuses_an_unfinished_study(tmp_path, fake, capsys):
    store = run_pbt(tmp_path, population=2, interval=2, steps=4)
    from sqlalchemy import update

    from mupfast.tuning.pbt.schema import studies

    with store.engine.begin() as c:  # as if the last generation were still running
        c.execute(update(studies).values(generation=1))
    argv = ["transfer", "--pbt", "s", "--storage", f"sqlite:///{tmp_path}/pbt.db", "--target", str(TARGET)]
    assert main(argv) == 2
    assert "at generation 1 of 2" in capsys.readouterr().err


def test_the_pbt_space_file_matches_the_built_in_space():
    cfg = load_config(PROXY)
    assert pbt_module.pbt_space(str(ROOT / "configs" / "pbt-space.yaml"), cfg) == pbt_module.pbt_space(
        None, cfg, lambda s: None
    )
