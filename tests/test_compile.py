"""``train.compile``: each block compiles to one graph with no break (also under activation
checkpointing and with packed documents), the multipliers outside the blocks change without a
recompilation, and compiled training gives eager's losses."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import mupfast.train as trainer
from mupfast.config import with_overrides
from mupfast.distributed.activation_checkpoint import apply_activation_checkpointing
from mupfast.distributed.compile import compile_blocks
from mupfast.model import build_model, set_forward_multipliers
from mupfast.parametrization import multipliers, rules_for
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _compiled_model(*overrides: str, ac: str = "none"):
    cfg = tiny_config("model.attention_backend=torch", "model.num_layers=3", *overrides)
    model = build_model(cfg.model)
    apply_activation_checkpointing(model, ac)
    backend = CountingBackend()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend=backend)
    return cfg, model, backend


def _train_step(model, doc_ids=None):
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], tokens[:, 1:], doc_ids=doc_ids)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_a_block_compiles_to_one_graph_without_breaks(ac, packed):
    cfg, model, backend = _compiled_model(ac=ac)
    doc_ids = (torch.arange(16) >= 6).long().expand(2, 16) if packed else None
    _train_step(model, doc_ids)
    assert dict(counters["graph_break"]) == {}
    # Three blocks, one graph: they differ only in their parameters.
    assert backend.graphs == 1
    assert {"attn_branch_rms", "outlier_share", "attn_lse_sq_mean"} <= set(model.stability_stats())


def test_output_and_embedding_multipliers_change_without_a_recompilation():
    cfg, model, backend = _compiled_model()
    _train_step(model)
    changed = with_overrides(cfg, {"model.output_logits_alpha": 3.0, "model.embeddings_scale": 2.5})
    set_forward_multipliers(model, rules_for(model, changed.model), multipliers(changed.model))
    assert model.readout.logit_scale != multipliers(cfg.model).logit_scale
    model.record_indicators(False)  # a step that logs nothing: its own graph, once
    _train_step(model)
    model.record_indicators(True)
    _train_step(model)
    assert backend.graphs == 2


def test_compiled_training_gives_the_eager_losses(tmp_path):
    common = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "train.save_final=false"]
    losses = {}
    for compiled in (False, True):
        cfg = tiny_config(
            *common,
            f"train.compile={str(compiled).lower()}",
            "train.activation_checkpointing=full",
            tmp_path=tmp_path / str(compiled),
        )
        trainer.train(cfg)
        losses[compiled] = [r["loss"] for r in read_metrics(cfg.train.run_dir, "train")]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ac", ["none", "full"])
def test_gpu_compiled_blocks_with_our_kernels_match_eager(ac):
    cfg = tiny_config("model.attention_backend=triton", "model.readout_backend=triton", "model.num_layers=3")
    torch.manual_seed(0)
    eager = build_model(cfg.model, device="cuda")
    compiled = build_model(cfg.model, device="cuda")
    compiled.load_state_dict(eager.state_dict())
    for m in (eager, compiled):
        apply_activation_checkpointing(m, ac)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(compiled)
    tokens = torch.randint(0, 256, (4, 33), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [m(tokens[:, :-1], tokens[:, 1:]) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=2e-2)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        rel = (a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-12)
        assert rel < 5e-2, name
