"""PBT with real training segments (``mupfast train`` children with train.stop_at and resume): exploit
copies weights, optimizer state and hyperparameters exactly; a diverging member is replaced; the
report and ``transfer --pbt`` work from the study."""

import json
from pathlib import Path

import pytest
import yaml

import mupfast.tuning.pbt.pbt as pbt_module
from mupfast.cli import main
from mupfast.config import load_config
from mupfast.tuning.pbt.store import PbtStore
from mupfast.tuning.space import parse_space
from tests.test_pbt import PROXY, TARGET, tiny


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def last_of(recs: list[dict], kind: str, step: int, key: str) -> float:
    return [r[key] for r in recs if r["kind"] == kind and r["step"] == step][-1]


@pytest.mark.slow
def test_exploit_copies_weights_optimizer_state_and_hyperparameters_exactly(tmp_path):
    k = 2
    cfg = load_config(PROXY, tiny(tmp_path))
    spec = pbt_module.PbtSpec(
        cfg,
        study="exact",
        storage=f"sqlite:///{tmp_path}/pbt.db",
        population=2,
        interval=k,
        steps=2 * k,
        space=parse_space(yaml.safe_load("lr: {low: 1.0e-3, high: 3.0e-2}")),
        quantile=0.5,
        perturb=1.0,
        resample_p=0.0,
        seed=11,
        pbt_dir=tmp_path / "members",
        launcher="python",
        threads=1,
        say=lambda s: None,
    )
    store = pbt_module.pbt(spec)
    segs = store.segments()
    assert [s.status for s in segs] == ["ok"] * 4
    first = {s.member: s for s in segs if s.generation == 0}
    assert first[0].hparams != first[1].hparams  # the copied member really changes its values
    (e,) = [e for e in store.events() if e["kind"] == "exploit"]
    src, dst = (records(tmp_path / "members" / f"member-{m:02d}") for m in (e["source"], e["member"]))
    # Step k+1's loss is the copied weights' forward; step k+2's follows an update with the copied
    # Adam moments and lr; the val loss at 2k uses the same eval batches.
    for step in (k + 1, k + 2):
        assert last_of(dst, "train", step, "loss") == last_of(src, "train", step, "loss"), step
        assert last_of(dst, "train", step, "lr/q") == last_of(src, "train", step, "lr/q")
    assert last_of(dst, "eval", 2 * k, "val_loss") == last_of(src, "eval", 2 * k, "val_loss")
    # ... while before the exploit the two members trained differently
    assert last_of(dst, "train", k, "loss") != last_of(src, "train", k, "loss")


@pytest.mark.slow
def test_a_real_pbt_replaces_a_diverging_member_reports_and_transfers(tmp_path, monkeypatch, capsys):
    first = [{"lr": 1.0e6}, {"lr": 3.0e-3}, {"lr": 1.0e-2}]  # member 0 diverges at once
    monkeypatch.setattr(pbt_module, "initial_hparams", lambda space, seed, n: first)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 3.0e-2}\n")
    db = f"sqlite:///{tmp_path}/pbt.db"
    argv = ["pbt", "--config", str(PROXY), "--study", "real", "--storage", db, "--space", str(space)]
    argv += ["--population", "3", "--interval", "2", "--steps", "4", "--seed", "3", "--threads", "1"]
    argv += [
        "--pbt-dir",
        str(tmp_path / "members"),
        "--report-dir",
        str(tmp_path / "report"),
        *tiny(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    store = PbtStore(db, "real")
    gen0 = {s.member: s for s in store.segments(0)}
    assert gen0[0].status == "nonfinite", gen0[0]
    assert [s.status for s in store.segments(1)] == ["ok"] * 3  # member 0 trains on from a good one
    assert "1 nonfinite" in out and (tmp_path / "report" / "lineage.png").is_file()

    target = tmp_path / "target.yaml"
    assert (
        main(["transfer", "--pbt", "real", "--storage", db, "--target", str(TARGET), "--out", str(target)])
        == 0
    )
    cfg = load_config(target)
    lin = json.loads((tmp_path / "report" / "lineage.json").read_text())
    assert cfg.schedule.piecewise == lin["piecewise"] and cfg.optim.lr == lin["lineage"][0]["hparams"]["lr"]
    assert "m = 8" in capsys.readouterr().out  # the target's rules table: 256 / 32
