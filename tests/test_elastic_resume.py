"""Resuming on another number of ranks or ZeRO stage (mupfast.distributed.elastic), on CPU over gloo.

A run cut at step N and resumed on another layout with the same global batch must log the losses of
the uninterrupted run: the universal conversion carries every parameter's fp32 weights and Adam
moments (HyperP's Muon momentum among them, under exp_avg), the sampler is a function of (seed, step,
global micro-batch index), and only the order of the gradient reduction differs (hence 1e-5
relative, not bit equality). Also: a PBT exploit copy and a sweep trial's retry on another world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

import mupfast.train as trainer
from mupfast.config import load_config
from mupfast.distributed.elastic import (
    ResumePlan,
    check_universal,
    ensure_universal,
    explain_resume,
    plan_resume,
)
from mupfast.errors import CheckpointError
from mupfast.rundir import copy_checkpoint, read_metrics, universal_dir, write_checkpoint_layout
from tests.helpers import tiny_config, train_on_ranks

# μP with m = 2 (groups with different lr multipliers), weight decay, and per-component clipping
# tight enough to act, with its own threshold for the embedding: the groups' hyperparameters differ.
MUP_GROUPS = [
    "model.mup_base_hidden_size=16",
    "model.mup_base_filter_size=32",
    "optim.weight_decay=0.1",
    "optim.lr=1e-2",
    "clip.max_norm=0.05",
    "clip.component_max_norm={embedding: 0.5}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.micro_batch_size=2",
    "train.steps=8",
    "data.max_corpus_bytes=100000",
]
GLOBAL_SEQUENCES = 4  # micro_batch_size 2 × ranks × grad_accum_steps


def _layout(ranks: int, stage: int) -> list[str]:
    return [f"zero.stage={stage}", f"train.grad_accum_steps={GLOBAL_SEQUENCES // (2 * ranks)}"]


def _train(tmp_path: Path, name: str, ranks: int, stage: int, *extra: str):
    cfg = tiny_config(*MUP_GROUPS, *_layout(ranks, stage), *extra, tmp_path=tmp_path / "runs")
    cfg.train.run_dir = str(tmp_path / name)
    proc = train_on_ranks(cfg, ranks, tmp_path / f"{name}-{ranks}r{stage}.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def _resume_case(
    tmp_path, src: tuple[int, int], dst: tuple[int, int], *extra: str, universal: bool = True
) -> None:
    _train(tmp_path, "full", *src, *extra)
    _train(tmp_path, "cut", *src, *extra, "train.stop_at=4")
    proc = _train(tmp_path, "cut", *dst, *extra)
    assert ("through DeepSpeed's universal checkpoint" in proc.stderr + proc.stdout) == universal
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    for step in range(5, 9):
        assert cut[step] == pytest.approx(full[step], rel=1e-5), step
    assert (universal_dir(tmp_path / "cut" / "checkpoints", "step00000004") / "zero").is_dir() == universal


@pytest.mark.distributed
def test_two_ranks_zero2_resume_on_one_rank_with_accumulation(tmp_path):
    _resume_case(tmp_path, (2, 2), (1, 2))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "src, dst",
    [((1, 2), (2, 2)), ((2, 1), (2, 3)), ((2, 3), (2, 2))],
    ids=["1to2ranks", "zero1to3", "zero3to2"],
)
def test_resume_on_another_layout_follows_the_uninterrupted_run(tmp_path, src, dst):
    _resume_case(tmp_path, src, dst)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_tied_model_on_packed_documents_moves_from_zero3_to_one_rank_zero2(tmp_path):
    packed = ["model.tie_embeddings=true", "data.document_masking=true", "data.reset_position_ids=true"]
    _resume_case(tmp_path, (2, 3), (1, 2), *packed)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_mixture_of_experts_moves_from_two_ranks_to_one(tmp_path):
    # Load balance counted per micro-batch: the same on any number of ranks (data_parallel is not).
    moe = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_balance_scope=micro_batch"]
    _resume_case(tmp_path, (2, 2), (1, 2), *moe)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero0_resumes_on_another_world_size_as_it_is(tmp_path):
    _resume_case(tmp_path, (2, 0), (1, 0), universal=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_pbt_exploit_copy_resumes_on_another_world_size(tmp_path):
    """PBT's exploit copies a member's tag into another member's run (rundir.copy_checkpoint): the copy
    carries the layout record, so a member on another number of ranks converts it in its own run."""
    _train(tmp_path, "full", 2, 2)
    _train(tmp_path, "donor", 2, 2, "train.stop_at=4")
    copy_checkpoint(tmp_path / "donor", tmp_path / "member", 4)
    cfg = tiny_config(*MUP_GROUPS, *_layout(1, 2), tmp_path=tmp_path / "runs")
    cfg.train.run_dir = str(tmp_path / "member")
    trainer.train(cfg)
    assert (universal_dir(tmp_path / "member" / "checkpoints", "step00000004") / "zero").is_dir()
    assert not (tmp_path / "donor" / "checkpoints" / "universal").exists()
    full, member = _losses(tmp_path / "full"), _losses(tmp_path / "member")
    for step in range(5, 9):
        assert member[step] == pytest.approx(full[step], rel=1e-5), step


@pytest.mark.distributed
@pytest.mark.slow
def test_a_sweep_trial_whose_worker_died_resumes_on_another_world_size(tmp_path, monkeypatch):
    """A sweep worker on 2 ranks dies after its trial's checkpoint at step 4 (its heartbeat stops); a
    worker on one rank fails that trial, takes its retry (the same values), and trains on from the
    checkpoint through the universal conversion."""
    import optuna

    import mupfast.tuning.storage as storage_module
    import mupfast.tuning.sweep.sweep as sweep_module
    from mupfast.config import with_overrides
    from mupfast.rundir import launch_paths
    from mupfast.tuning.space import Range
    from mupfast.tuning.trial import trial_config

    monkeypatch.setattr(storage_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage_module, "GRACE_S", 2)  # the first attempt trains for longer than this
    base = tiny_config(*MUP_GROUPS, *_layout(2, 2), "train.save_every=4", tmp_path=tmp_path / "runs")
    space = {"lr": Range(1e-3, 1e-2)}
    spec = sweep_module.SweepSpec(
        base,
        study_name="elastic",
        storage=f"sqlite:///{tmp_path}/sweep.db",
        n_trials=1,
        space=space,
        pruner="none",
        sweep_dir=tmp_path / "trials",
        launcher="python",
        threads=1,
        progress=False,
    )
    # The first worker: trial 0 on 2 ranks, which stops beating after the checkpoint of step 4.
    study = sweep_module.open_study(spec, space, spec.storage, optuna.pruners.NopPruner())
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # ask(), not optimize(): beat by hand
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    first = (tmp_path / "trials" / "trial-0000").resolve()
    cfg = trial_config(base, {"lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True)}, first)
    proc = train_on_ranks(with_overrides(cfg, {"train.stop_at": 4}), 2, tmp_path / "first.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The second worker, on one rank.
    study = sweep_module.sweep(spec)
    dead, retry = study.trials
    assert (dead.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert retry.params == dead.params and retry.user_attrs["resumed_from"] == f"{first} step 4"
    log = launch_paths(retry.user_attrs["run_dir"])[1].read_text()
    assert "written by 2 rank(s) at ZeRO-2, on 1 rank(s) at ZeRO-2 through DeepSpeed's universal" in log
    assert "global batch changed from 4 to 2 sequences a step" in log  # the same config, half the ranks
    steps = [r["step"] for r in read_metrics(retry.user_attrs["run_dir"], "train")]
    assert (steps[0], steps[-1]) == (5, 8)
    assert not (first / "checkpoints").exists()  # a sweep keeps metrics, not weights


# HyperP: Muon's momentum on the hidden matrices, AdamH's moments on the readout, every matrix on its
# sphere; the clip tight enough that the Muon groups' gradients are clipped too.
HYPERP = ["model.parametrization=hyperp", "clip.max_norm=0.05"]


@pytest.mark.distributed
@pytest.mark.slow
def test_hyperp_moves_from_two_ranks_zero2_to_one_rank_with_accumulation(tmp_path):
    _resume_case(tmp_path, (2, 2), (1, 2), *HYPERP)


def _train_here(tmp_path: Path, name: str, stage: int, *extra: str) -> None:
    cfg = tiny_config(*MUP_GROUPS, *_layout(1, stage), *HYPERP, *extra, tmp_path=tmp_path / "runs")
    cfg.train.run_dir = str(tmp_path / name)
    trainer.train(cfg)


@pytest.mark.parametrize(
    "src, dst", [(2, 3), pytest.param(3, 1, marks=pytest.mark.slow)], ids=["zero2to3", "zero3to1"]
)
def test_hyperp_moves_to_another_zero_stage_in_one_process(tmp_path, src, dst):
    """The Muon momentum partitions through DeepSpeed's universal checkpoint, the radii read again from
    the weights: the losses after the resume are the uninterrupted run's."""
    _train_here(tmp_path, "full", src)
    _train_here(tmp_path, "cut", src, "train.stop_at=4")
    _train_here(tmp_path, "cut", dst)
    folder = universal_dir(tmp_path / "cut" / "checkpoints", "step00000004")
    assert (folder / "zero" / "blocks.0.attn.q.weight" / "exp_avg.pt").is_file()  # Muon's momentum
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    for step in range(5, 9):
        assert cut[step] == pytest.approx(full[step], rel=1e-5), step


def _muon_states(x):
    """Every Muon state in a loaded checkpoint file: a sphere radius and no step (AdamH's has one)."""
    if isinstance(x, dict):
        if "radius" in x and "exp_avg" in x and "step" not in x:
            yield x
        for v in x.values():
            yield from _muon_states(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _muon_states(v)


def _as_written_before(ckpt: Path) -> int:
    """Rewrite a HyperP checkpoint as mupfast wrote it before Muon's momentum moved to ``exp_avg``:
    ``momentum_buffer``, no zero ``exp_avg_sq``, no ``muon_momentum`` in the layout. The states rewritten."""
    import torch

    n = 0
    for f in ckpt.glob("*optim_states.pt"):
        sd = torch.load(f, weights_only=False)
        for st in list(_muon_states(sd)):
            assert st["exp_avg_sq"].stride() == (0,)  # the zero costs one element
            st["momentum_buffer"] = st.pop("exp_avg")
            del st["exp_avg_sq"]
            n += 1
        torch.save(sd, f)
    layout = json.loads((ckpt / "mupfast_layout.json").read_text())
    del layout["muon_momentum"]
    (ckpt / "mupfast_layout.json").write_text(json.dumps(layout))
    return n


def test_a_hyperp_checkpoint_written_before_resumes_on_its_layout_and_is_refused_on_another(tmp_path):
    _train_here(tmp_path, "full", 2)
    _train_here(tmp_path, "cut", 2, "train.stop_at=4")
    ckpt = tmp_path / "cut" / "checkpoints"
    assert _as_written_before(ckpt / "step00000004") == 6  # q, k, v, o, ffn_in, ffn_out: one flat group each
    cfg = tiny_config(*MUP_GROUPS, *_layout(2, 3), *HYPERP)
    with pytest.raises(CheckpointError) as e:
        plan_resume(cfg, 2, ckpt, "step00000004")
    assert "before HyperP's Muon momentum was kept where" in str(e.value) and "\n" not in str(e.value)
    assert "resume on 1 rank(s) at zero.stage=2" in str(e.value)
    _train_here(tmp_path, "cut", 2)  # the same layout: loaded as it is, the momentum renamed
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [cut[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]  # bit for bit


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_a_kill_during_the_conversion_leaves_the_original_and_the_next_run_converts_again(tmp_path):
    _train(tmp_path, "full", 2, 2)
    _train(tmp_path, "cut", 2, 2, "train.stop_at=4")
    ckpt = tmp_path / "cut" / "checkpoints"
    before = _tree_digest(ckpt / "step00000004")
    cfg = tiny_config(*MUP_GROUPS, *_layout(1, 2), tmp_path=tmp_path / "runs")
    cfg.train.run_dir = str(tmp_path / "cut")
    proc = train_on_ranks(cfg, 1, tmp_path / "kill.yaml", popen=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((ckpt / "universal").glob(".step00000004.tmp-*")):  # the conversion has begun
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion never started"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "universal" / "step00000004").exists()
    assert _tree_digest(ckpt / "step00000004") == before  # the original, byte for byte
    assert (ckpt / "latest").read_text().strip() == "step00000004"
    _train(tmp_path, "cut", 1, 2)
    assert not list((ckpt / "universal").glob(".step00000004.tmp-*"))
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    for step in range(5, 9):
        assert cut[step] == pytest.approx(full[step], rel=1e-5), step


@pytest.mark.distributed
@pytest.mark.slow
def test_a_truncated_universal_folder_is_a_one_line_error_naming_it(tmp_path):
    _train(tmp_path, "cut", 2, 2, "train.stop_at=4")
    ckpt = tmp_path / "cut" / "checkpoints"
    folder = ensure_universal(ckpt, "step00000004", rank=0, timeout_s=60)
    check_universal(folder)
    victim = next((folder / "zero").glob("*/exp_avg.pt"))
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        check_universal(folder)
    assert str(folder) in str(e.value) and victim.parent.name in str(e.value) and "\n" not in str(e.value)
    (folder / "mupfast_universal.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a complete universal checkpoint"):
        check_universal(folder)


# ----------------------------------------------------------------------------------------------
# The plan, without training


def _checkpoint(tmp_path: Path, world: int, stage: int, sequences: int = GLOBAL_SEQUENCES) -> Path:
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    layout = {"world_size": world, "zero_stage": stage, "sequences_per_step": sequences}
    write_checkpoint_layout(ckpt, "step00000004", layout)
    return ckpt


@pytest.mark.parametrize(
    "saved, now, universal",
    [((2, 2), (2, 2), False), ((2, 2), (1, 2), True), ((2, 1), (2, 3), True), ((2, 0), (1, 0), False)],
)
def test_the_plan_converts_only_when_the_layout_changed(tmp_path, saved, now, universal):
    ckpt = _checkpoint(tmp_path, *saved)
    cfg = load_config(None, [f"zero.stage={now[1]}"])
    plan = plan_resume(cfg, now[0], ckpt, "step00000004")
    assert plan.universal == universal
    assert plan.tag == ("universal/step00000004" if universal else "step00000004")


@pytest.mark.parametrize(
    "saved, stage, overrides, words",
    [
        ((2, 0), 2, [], "convert between ZeRO stages 1–3 only: resume at zero.stage=0"),
        ((2, 2), 0, [], "convert between ZeRO stages 1–3 only: resume at zero.stage=2"),
    ],
)
def test_what_the_universal_format_cannot_carry_is_one_line(tmp_path, saved, stage, overrides, words):
    ckpt = _checkpoint(tmp_path, *saved)
    cfg = load_config(None, [f"zero.stage={stage}", *overrides])
    with pytest.raises(CheckpointError) as e:
        plan_resume(cfg, 1, ckpt, "step00000004")
    assert words in str(e.value) and str(ckpt / "step00000004") in str(e.value) and "\n" not in str(e.value)


def test_a_hyperp_checkpoint_converts_once_its_layout_says_where_the_muon_momentum_is(tmp_path):
    cfg = load_config(None, ["zero.stage=2", "model.parametrization=hyperp"])
    ckpt = _checkpoint(tmp_path, 2, 2)  # as written before: no "muon_momentum"
    with pytest.raises(CheckpointError, match="before HyperP's Muon momentum was kept where"):
        plan_resume(cfg, 1, ckpt, "step00000004")
    layout = {"world_size": 2, "zero_stage": 2, "sequences_per_step": 4, "muon_momentum": "exp_avg"}
    write_checkpoint_layout(ckpt, "step00000004", layout)
    assert plan_resume(cfg, 1, ckpt, "step00000004").universal


def test_a_changed_global_batch_is_said(tmp_path, caplog):
    cfg = load_config(None, ["zero.stage=2", "train.micro_batch_size=4"])
    plan = ResumePlan(
        "universal/step00000004", True, {"world_size": 2, "zero_stage": 2, "sequences_per_step": 8}
    )
    with caplog.at_level(logging.INFO, logger="mupfast"):
        explain_resume(plan, cfg, 4, tmp_path)
    assert "written by 2 rank(s) at ZeRO-2, on 4 rank(s) at ZeRO-2" in caplog.text
    assert "global batch changed from 8 to 16 sequences a step" in caplog.text


def test_every_checkpoint_records_the_layout_that_wrote_it(tmp_path):
    cfg = tiny_config("train.steps=2", "train.eval_every=0", "zero.stage=1", tmp_path=tmp_path)
    trainer.train(cfg)
    layout = json.loads(
        (Path(cfg.train.run_dir) / "checkpoints" / "step00000002" / "mupfast_layout.json").read_text()
    )
    assert layout == {
        "world_size": 1,
        "zero_stage": 1,
        "sequences_per_step": cfg.train.micro_batch_size,
        "muon_momentum": "exp_avg",  # where HyperP's Muon momentum is: the converter reads it there
    }
