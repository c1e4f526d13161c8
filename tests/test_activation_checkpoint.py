"""Activation checkpointing changes memory, never numbers: losses and gradients with none / full /
every_k / selective are equal, for μP, MoE and hyperp, in one process and under 2-rank ZeRO-3."""

import pytest
import torch

import mupfast.train as trainer
from mupfast.distributed.activation_checkpoint import apply_activation_checkpointing, checkpointed_blocks
from mupfast.model import build_model
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config
from tests.test_train import _deepspeed_run

MODES = [("none", 2), ("full", 2), ("every_k", 2), ("every_k", 3), ("selective", 2)]
FAMILIES = {
    "mup": [],
    "moe": ["model.moe_experts=4", "model.moe_top_k=2", "model.num_layers=3"],
    "hyperp": ["model.parametrization=hyperp"],
    "packed": ["model.num_layers=3", "model.attention_backend=triton"],
}


def _grads(overrides: list[str], mode: str, every: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = tiny_config("model.num_layers=4", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_activation_checkpointing(model, mode, every)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 25), generator=g)
    # Two documents per row: the packed path (doc ids and positions) goes through the checkpoint too.
    doc_ids = (torch.arange(24) >= 10).long().expand(3, 24)
    loss = model(tokens[:, :-1], tokens[:, 1:], doc_ids=doc_ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_losses_and_gradients_equal_the_run_without_checkpointing(family, one_torch_thread):
    loss0, grads0 = _grads(FAMILIES[family], "none", 2)
    for mode, every in MODES[1:]:
        loss, grads = _grads(FAMILIES[family], mode, every)
        assert torch.equal(loss, loss0), (family, mode, every)
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            assert torch.equal(g, grads0[name]), (family, mode, every, name)


def _saved_bytes(mode: str) -> int:
    """Bytes autograd keeps for the backward of one training forward (what checkpointing saves)."""
    cfg = tiny_config("model.num_layers=4", "model.attention_backend=torch")
    model = build_model(cfg.model)
    apply_activation_checkpointing(model, mode, 2)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    tokens = torch.randint(0, 256, (4, 33))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], tokens[:, 1:])
    return total


def test_checkpointing_keeps_fewer_activations_in_the_order_of_the_modes():
    none, every2, full = (_saved_bytes(m) for m in ("none", "every_k", "full"))
    # The readout (outside the blocks) still saves its inputs, so full cannot reach zero. (What the
    # selective mode keeps is held inside the checkpoint, out of these hooks' sight.)
    assert full < every2 < none
    assert none / full > 3


def test_the_modes_choose_their_blocks_and_leave_parameter_names_alone():
    assert checkpointed_blocks(5, "none") == []
    assert checkpointed_blocks(5, "full") == checkpointed_blocks(5, "selective") == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "every_k", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "every_k", 5) == [0]
    with pytest.raises(ValueError, match="must be one of"):
        checkpointed_blocks(5, "some")
    cfg = tiny_config()
    model = build_model(cfg.model)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, "full")
    assert list(model.state_dict()) == keys
    model.eval()  # evaluation runs the plain forward: no checkpoint, same numbers
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        plain = build_model(cfg.model)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        assert torch.equal(model(tokens), plain(tokens))


def test_the_trainer_gives_the_same_losses_with_and_without_checkpointing(tmp_path):
    common = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "train.save_final=false"]
    losses = {}
    for mode in ("none", "every_k"):
        cfg = tiny_config(*common, f"train.activation_checkpointing={mode}", tmp_path=tmp_path / mode)
        trainer.train(cfg)
        losses[mode] = [r["loss"] for r in read_metrics(cfg.train.run_dir, "train")]
    assert len(losses["none"]) == 4 and losses["none"] == losses["every_k"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["mup", "hyperp"])
def test_two_rank_zero3_with_full_checkpointing_matches_no_checkpointing(tmp_path, parametrization):
    """ZeRO-3 gathers each block's parameters again for the recomputation (MoE experts included)."""
    base = [
        f"model.parametrization={parametrization}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.steps=3",
        "train.micro_batch_size=2",
        "train.save_final=false",
        "zero.stage=3",
        "model.moe_experts=4",
        "model.moe_top_k=2",
    ]
    none = _deepspeed_run(tmp_path, "none", [*base, "train.activation_checkpointing=none"], ranks=2)
    full = _deepspeed_run(tmp_path, "full", [*base, "train.activation_checkpointing=full"], ranks=2)
    assert sorted(none) == [1, 2, 3] and full == none
