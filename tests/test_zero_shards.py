"""ZeRO partitions as our optimizer sees them: the fragment layouts, Muon on a partition equal to
Muon on whole matrices, and 2-rank hyperp runs at ZeRO 1–3 equal to the single-process run with one
norm collective per step."""

import json
import random

import pytest
import torch

import mupfast.train as trainer
from mupfast.distributed.zero_shards import (
    GroupShards,
    ZeroLayoutError,
    contiguous_fragments,
    per_tensor_fragments,
)
from mupfast.optim.muon import muon_sphere_update
from mupfast.optim.muon_sharded import muon_sphere_update_sharded
from mupfast.optim.sphere import adam_sphere_update
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_shapes(rng: random.Random, n: int) -> list[torch.Size]:
    return [torch.Size((rng.randint(1, 9), rng.randint(1, 9))) for _ in range(n)]


def _contiguous(shapes, world, rng):
    numels = [s.numel() for s in shapes]
    pads = [rng.randint(0, 3) for _ in shapes]  # DeepSpeed may align each parameter's start
    offsets = [sum(numels[:k]) + sum(pads[:k]) for k in range(len(shapes))]
    total = offsets[-1] + numels[-1]
    partition = -(-total // world) + rng.randint(0, 2)  # end padding
    return offsets, partition, contiguous_fragments(offsets, numels, partition, world)


def _laid_out(tensors, offsets, partition: int) -> torch.Tensor:
    """A one-rank flat partition holding ``tensors`` at ``offsets`` (zeros in between)."""
    flat = torch.zeros(partition)
    for off, t in zip(offsets, tensors):
        flat[off : off + t.numel()] = t.reshape(-1)
    return flat


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_fragments_rebuild_every_matrix_from_the_partitions(world):
    rng = random.Random(world)
    shapes = _random_shapes(rng, 6)
    mats = [torch.randn(s) for s in shapes]
    # contiguous: one flat buffer cut into equal partitions
    offsets, partition, ranks = _contiguous(shapes, world, rng)
    flat = torch.full((world * partition,), float("nan"))
    for off, m in zip(offsets, mats):
        flat[off : off + m.numel()] = m.reshape(-1)
    parts = flat.view(world, partition)
    shards = GroupShards(shapes, partition, ranks, rank=0)
    for k, pieces in enumerate(shards.by_matrix):
        rebuilt = torch.cat([parts[r, f.offset : f.offset + f.length] for r, f in pieces]).view(shapes[k])
        assert torch.equal(rebuilt, mats[k])
    # per tensor: each matrix split into `world` padded parts, parts concatenated per rank
    pns = [-(-s.numel() // world) for s in shapes]
    per_rank = [torch.cat([torch.nn.functional.pad(m.reshape(-1), (0, pn * world - m.numel()))[r * pn : (r + 1) * pn]
                           for m, pn in zip(mats, pns)]) for r in range(world)]  # fmt: skip
    shards = GroupShards(
        shapes, sum(pns), per_tensor_fragments([s.numel() for s in shapes], pns, world), rank=0
    )
    for k, pieces in enumerate(shards.by_matrix):
        rebuilt = torch.cat([per_rank[r][f.offset : f.offset + f.length] for r, f in pieces]).view(shapes[k])
        assert torch.equal(rebuilt, mats[k])


def test_every_matrix_has_one_owner_among_the_ranks_holding_it_and_the_work_is_balanced():
    rng = random.Random(3)
    world = 4
    shapes = [torch.Size((64, 64))] * 8 + _random_shapes(rng, 5)
    pns = [-(-s.numel() // world) for s in shapes]
    ranks = per_tensor_fragments([s.numel() for s in shapes], pns, world)  # ZeRO-3: every rank holds all
    owned = [GroupShards(shapes, sum(pns), ranks, rank=r).owned() for r in range(world)]
    assert sorted(k for o in owned for k in o) == list(range(len(shapes)))  # each matrix exactly once
    assert [len([k for k in o if k < 8]) for o in owned] == [2, 2, 2, 2]  # the big ones spread evenly
    offsets, partition, ranks = _contiguous(shapes, world, rng)  # stages 1/2: owners hold a piece
    shards = [GroupShards(shapes, partition, ranks, rank=r) for r in range(world)]
    for r, gs in enumerate(shards):
        for k in gs.owned():
            assert any(rr == r for rr, _ in gs.by_matrix[k])


def test_a_layout_that_misses_elements_is_refused():
    shapes = [torch.Size((4, 4))]
    ranks = contiguous_fragments([0], [16], 6, world=2)  # 2 × 6 < 16
    with pytest.raises(ZeroLayoutError, match="cover 12 of 16"):
        GroupShards(shapes, 6, ranks, rank=0)


def test_muon_on_a_partition_equals_muon_on_each_whole_matrix():
    rng = random.Random(7)
    shapes = _random_shapes(rng, 5)
    offsets, partition, ranks = _contiguous(shapes, 1, rng)
    shards = GroupShards(shapes, partition, ranks, rank=0)
    mats = [torch.randn(s, dtype=torch.float32) for s in shapes]
    flat = _laid_out(mats, offsets, partition)
    state_flat, states = {}, [{} for _ in mats]
    for _ in range(3):  # momentum and radius carry over between steps
        grads = [torch.randn(s) for s in shapes]
        gflat = _laid_out(grads, offsets, partition)
        coef = torch.tensor(0.7)
        muon_sphere_update_sharded(flat, gflat, state_flat, shards, lr=0.05, coef=coef)
        for m, g, st in zip(mats, grads, states):
            muon_sphere_update(m, g, st, lr=0.05, coef=coef)
        for off, m in zip(offsets, mats):
            torch.testing.assert_close(flat[off : off + m.numel()].view(m.shape), m, rtol=1e-5, atol=1e-6)
    for off, m, st in zip(offsets, mats, states):  # on the init sphere, padding untouched
        assert flat[off : off + m.numel()].norm().item() == pytest.approx(st["radius"].item(), rel=1e-6)
    covered = torch.zeros(partition, dtype=torch.bool)
    for f in shards.local:
        covered[f.offset : f.offset + f.length] = True
    assert torch.all(flat[~covered] == 0)


def test_adamh_on_a_partition_equals_adamh_on_each_whole_matrix_and_a_float64_reference():
    rng = random.Random(11)
    shapes = _random_shapes(rng, 4)
    offsets, partition, ranks = _contiguous(shapes, 1, rng)
    shards = GroupShards(shapes, partition, ranks, rank=0)
    seg = shards.segment_ids("cpu")
    mats = [torch.randn(s) for s in shapes]
    ref = [m.double() for m in mats]
    flat = _laid_out(mats, offsets, partition)
    state_flat, states = {}, [{} for _ in mats]
    m1 = [torch.zeros_like(r) for r in ref]
    m2 = [torch.zeros_like(r) for r in ref]
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.05
    for t in range(1, 4):
        grads = [torch.randn(s) for s in shapes]
        gflat = _laid_out(grads, offsets, partition)
        adam_sphere_update(flat, gflat, state_flat, lr=lr, coef=0.5, seg=seg, n=len(shapes))
        for k, (m, g, st) in enumerate(zip(mats, grads, states)):
            adam_sphere_update(m, g, st, lr=lr, coef=0.5)
            g64 = g.double() * 0.5  # float64 AdamH by hand
            m1[k] = b1 * m1[k] + (1 - b1) * g64
            m2[k] = b2 * m2[k] + (1 - b2) * g64 * g64
            u = (m1[k] / (1 - b1**t)) / ((m2[k] / (1 - b2**t)).sqrt() + eps)
            r0 = ref[k].norm() if t == 1 else states[k]["radius"].double()
            w = ref[k] - lr * ref[k].norm() / u.norm() * u
            ref[k] = w * r0 / w.norm()
        for off, m, r in zip(offsets, mats, ref):
            torch.testing.assert_close(flat[off : off + m.numel()].view(m.shape), m, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.double(), r, rtol=1e-5, atol=1e-6)
    for m, st in zip(mats, states):
        assert m.norm().item() == pytest.approx(st["radius"].item(), rel=1e-6)


HYPERP_BASE = [
    "model.parametrization=hyperp",
    "train.log_every=1",
    "train.eval_every=0",
    "train.steps=4",
    "train.micro_batch_size=2",
    "clip.max_norm=0.05",  # low enough that the Muon groups' gradients are clipped too
    "clip.global_max_norm=0.5",  # and the global clip on top: needs every group's norm at once
]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_hyperp_matches_single_process_with_one_norm_collective(tmp_path, stage):
    from tests.test_train import _deepspeed_run

    single = trainer.train(
        tiny_config(*HYPERP_BASE, "train.grad_accum_steps=2", tmp_path=tmp_path / "single")
    )
    two = _deepspeed_run(
        tmp_path,
        f"zero{stage}",
        [*HYPERP_BASE, f"zero.stage={stage}"],
        ranks=2,
        module="tests.collective_probe",
    )
    assert sorted(two) == list(range(1, 5))
    for step, loss in single.train_losses.items():
        assert two[step] == pytest.approx(loss, rel=2e-5), step
    run = tmp_path / f"zero{stage}" / "run"
    a, b = (read_metrics(d, "train")[-1] for d in (tmp_path / "single" / "run", run))
    for key in a:
        if key.startswith(("grad_norm/", "clip_coef/")):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert min(v for k, v in a.items() if k.startswith("clip_coef/")) < 0.5
    muon_groups = 6  # q, k, v, o, ffn_in, ffn_out
    sphere_groups = muon_groups + 1  # and the readout (AdamH)
    for r in (0, 1):
        counts = json.loads((run / f"collectives_rank{r}.json").read_text())
        # the clip norms of every group: one all-reduce per step, issued before DeepSpeed's group loop
        assert counts.get("mupfast.distributed.zero_shards.all_reduce") == 4, counts
        assert "mupfast.optim.optimizer.all_reduce" not in counts, counts
        # Muon: per group and step one gather of the look-ahead and one reduce-scatter of the results;
        # every sphere group: two norm reductions
        assert counts.get("mupfast.optim.muon_sharded.all_gather") == 4 * muon_groups, counts
        assert counts.get("mupfast.optim.muon_sharded.reduce_scatter_single") == 4 * muon_groups, counts
        assert counts.get("mupfast.optim.sphere.all_reduce") == 2 * 4 * sphere_groups, counts


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_hyperp_keeps_every_fp32_master_matrix_on_its_sphere(tmp_path, monkeypatch, stage):
    """bf16 at stage 1 goes through DeepSpeed's BF16_Optimizer, at stage 3 through ZeRO-3: both hand
    Muon flat partitions, and the fp32 masters must stay at their init norm."""
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = tiny_config(*HYPERP_BASE[:4], "train.precision=bf16", f"zero.stage={stage}", tmp_path=tmp_path)
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before building the model
    # DeepSpeed casts the model to bf16 before it makes the fp32 masters: the radius is ‖bf16(W₀)‖
    init = {
        n: p.detach().bfloat16().float().norm().item()
        for n, p in trainer.build_model(cfg.model).named_parameters()
    }
    models = []
    real_build = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda mc: models.append(real_build(mc)) or models[-1])
    result = trainer.train(cfg)
    assert result.train_losses[4] < result.train_losses[1]
    hidden = [
        (n, p) for n, p in models[0].named_parameters() if ".attn." in n or ".mlp." in n or "readout" in n
    ]
    assert len(hidden) == 15
    for n, p in hidden:
        master = safe_get_full_fp32_param(p)
        assert master.norm().item() == pytest.approx(init[n], rel=1e-5), n
        assert not torch.equal(master, master.new_zeros(master.shape))


@pytest.mark.parametrize("stage", [2, 3])
def test_hyperp_under_zero_resumes_bitwise_with_its_partitioned_muon_state(tmp_path, monkeypatch, stage):
    from tests.helpers import assert_resume_is_bitwise

    overrides = [*HYPERP_BASE[:3], "train.steps=6", "train.save_every=3", f"zero.stage={stage}"]
    # bitwise: the momentum partitions and radii came back with the checkpoint
    assert_resume_is_bitwise(overrides, tmp_path, monkeypatch, steps=6, crash_step=3)
