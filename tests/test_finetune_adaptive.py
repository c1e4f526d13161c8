"""AdaMoLE's gate and threshold against a float64 torch reference (gradients too); AdaLoRA's
importance on a case with a known answer and against PEFT's RankAllocator, its budget at every step
and which ranks it prunes; both methods through the trainer."""

from __future__ import annotations

import pytest
import torch

import mupfast.train as trainer
from mupfast.finetune.adalora import RankAllocator, SVDAdapter
from mupfast.finetune.adamole import MoleAdapter
from mupfast.finetune.config import FinetuneConfig
from mupfast.finetune.lora import AdaptedLinear
from mupfast.rundir import read_metrics
from tests.test_finetune import adapted_by, data_dir, ft_config, make_base_run  # noqa: F401 (fixture)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# AdaMoLE


def mole_reference(x, A, B, Wg, wt, bt, scale, gate_scale, tau_max):
    """The authors' layer (zefang-liu/AdaMoLE), token by token through a loop over experts."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(gate_scale * flat @ Wg.t(), dim=-1)
    thresholds = torch.sigmoid(gate_scale * flat @ wt.t() + bt) * tau_max
    adapted_probs = probs - thresholds
    selected = (adapted_probs >= 0).to(flat.dtype)
    weights = adapted_probs * selected
    sums = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
    out = torch.zeros(flat.shape[0], B.shape[1], dtype=flat.dtype)
    for i in range(A.shape[0]):
        idx = torch.where(selected[:, i] > 0)[0]
        if len(idx):
            out = out.index_add(0, idx, weights[idx, i, None] * (flat[idx] @ A[i].t() @ B[i].t()) * scale)
    return out.reshape(*x.shape[:-1], B.shape[1]), selected


@pytest.mark.parametrize("experts,tau_max", [(4, None), (3, 0.2), (6, None)])
def test_adamole_gating_and_threshold_match_a_float64_reference_with_gradients(experts, tau_max):
    torch.manual_seed(experts)
    layer = MoleAdapter(24, 20, rank=3, alpha=6.0, experts=experts, max_threshold=tau_max).double()
    layer.gate_scale = 0.5
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 1.0)  # a spread gate: tokens use different numbers of experts
    layer.train()
    x = torch.randn(5, 7, 24, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    params = [layer.experts_A, layer.experts_B, layer.gate, layer.threshold, layer.threshold_bias]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    ref, selected = mole_reference(x_ref, *ref_params, layer.scale, 0.5, layer.max_threshold)
    ref.backward(g)
    counts = selected.sum(-1)
    assert counts.min() >= 1 and counts.max() > 1 and counts.min() < experts  # a real mix
    assert rel(out, ref) < 1e-12
    assert rel(x.grad, x_ref.grad) < 1e-12
    for p, q in zip(params, ref_params):
        assert rel(p.grad, q.grad) < 1e-10, p.shape
    stats = layer.stats()
    assert stats["experts_active"].item() == pytest.approx(counts.mean().item())


def test_adamole_starts_as_the_identity_and_cannot_be_merged():
    layer = MoleAdapter(16, 12, rank=2, alpha=4.0, experts=3)
    with torch.no_grad():
        layer.experts_A.normal_()
        layer.gate.normal_()
        layer.threshold.normal_()
    assert torch.equal(layer(torch.randn(4, 16)), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="adamole"):
        AdaptedLinear(torch.nn.Linear(16, 12), layer).merged()


# ---------------------------------------------------------------------------------------------
# AdaLoRA


def svd_adapters(n: int, rank: int, fan_in: int = 10, fan_out: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    out = {}
    for i in range(n):
        a = SVDAdapter(fan_in, fan_out, rank, alpha=rank)
        with torch.no_grad():
            for p in a.parameters():
                p.normal_()
        out[f"m{i}"] = AdaptedLinear(torch.nn.Linear(fan_in, fan_out), a)
    return out


def set_grads(modules, seed: int, scales: list[float] | None = None):
    gen = torch.Generator().manual_seed(seed)
    for k, m in enumerate(modules.values()):
        for p in m.adapter.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (scales[k] if scales else 1.0)


def test_adalora_importance_has_the_known_value_after_one_and_two_steps():
    f = FinetuneConfig(method="adalora", init_rank=3, target_rank=1, beta1=0.8, beta2=0.6)
    modules = svd_adapters(1, 3)
    alloc = RankAllocator(modules, f, total_steps=10)
    a = modules["m0"].adapter
    set_grads(modules, 1)
    i1 = (a.lora_E * a.lora_E.grad).abs().detach()
    alloc.update_importance()
    # Ī₁ = (1−β1)·I₁, Ū₁ = (1−β2)·|I₁ − Ī₁| = (1−β2)·β1·I₁
    assert torch.allclose(a.ipt_lora_E, 0.2 * i1, rtol=1e-6)
    assert torch.allclose(a.unc_lora_E, 0.4 * 0.8 * i1, rtol=1e-6)
    set_grads(modules, 2)
    i2 = (a.lora_E * a.lora_E.grad).abs().detach()
    alloc.update_importance()
    ipt2 = 0.8 * 0.2 * i1 + 0.2 * i2
    unc2 = 0.6 * 0.32 * i1 + 0.4 * (i2 - ipt2).abs()
    assert torch.allclose(a.ipt_lora_E, ipt2, rtol=1e-6) and torch.allclose(a.unc_lora_E, unc2, rtol=1e-6)
    # S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)
    s = {p: getattr(a, f"ipt_{p}") * getattr(a, f"unc_{p}") for p in ("lora_A", "lora_E", "lora_B")}
    expected = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
    assert torch.allclose(a.scores(), expected)


def test_adalora_scores_and_pruning_match_peft_rank_allocator():
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    n, r, budget = 3, 4, 5
    f = FinetuneConfig(
        method="adalora", init_rank=r, target_rank=1, beta1=0.85, beta2=0.85, tinit=0, tfinal=0
    )
    modules = svd_adapters(n, r)
    ours = RankAllocator(modules, f, total_steps=10)
    shim = torch.nn.Module()  # PEFT's parameter names (m0.lora_A.default, …) over the same tensors
    for name, m in modules.items():
        layer = torch.nn.Module()
        for part in ("lora_A", "lora_E", "lora_B"):
            setattr(layer, part, torch.nn.ParameterDict({"default": getattr(m.adapter, part)}))
        setattr(shim, name, layer)
    peft_cfg = peft.AdaLoraConfig(
        target_r=1, init_r=r, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, total_step=10
    )
    theirs = PeftAllocator(shim, peft_cfg, "default")
    for step in range(3):
        set_grads(modules, 10 + step)
        ours.update_importance()
        theirs.update_ipt(shim)
    for name, m in modules.items():
        for part in ("lora_A", "lora_E", "lora_B"):
            key = f"{name}.{part}.default"
            assert torch.allclose(getattr(m.adapter, f"ipt_{part}"), theirs.exp_avg_ipt[key])
            assert torch.allclose(getattr(m.adapter, f"unc_{part}"), theirs.exp_avg_unc[key])
    saved = {k: v.detach().clone() for k, v in shim.named_parameters()}
    pattern = theirs.mask_to_budget(shim, budget)  # zeros λ in place: restore after
    with torch.no_grad():
        for k, v in shim.named_parameters():
            v.copy_(saved[k])
    ours.budget = lambda step: budget
    ours.allocates = lambda step: True
    ours.allocate(1)
    for name, m in modules.items():
        assert m.adapter.rank_mask.bool().tolist() == pattern[f"{name}.lora_E.default"]
    assert sum(m.adapter.rank_mask.sum().item() for m in modules.values()) == budget


def test_adalora_stays_within_budget_at_every_step_and_prunes_the_least_important():
    f = FinetuneConfig(method="adalora", init_rank=6, target_rank=2, tinit=3, tfinal=4, delta_t=2)
    total = 30
    modules = svd_adapters(4, 6, seed=3)
    alloc = RankAllocator(modules, f, total_steps=total)
    budgets = [alloc.budget(t) for t in range(1, total + 1)]
    assert budgets[0] == 24 and budgets[-1] == 8 and budgets == sorted(budgets, reverse=True)
    for step in range(1, total + 1):
        set_grads(modules, step, scales=[1.0, 10.0, 100.0, 1000.0])  # importance grows with the index
        alloc.update_importance()
        before = {p: m.adapter.rank_mask.clone() for p, m in modules.items()}
        alloc.allocate(step)
        ranks = alloc.ranks()
        assert sum(ranks.values()) <= alloc.budget(step), step
        if alloc.allocates(step):
            assert sum(ranks.values()) == alloc.budget(step)
            scores = torch.cat([m.adapter.scores() for m in modules.values()])
            kept = torch.cat([m.adapter.rank_mask for m in modules.values()]).bool()
            assert scores[kept].min() >= scores[~kept].max() if (~kept).any() else True
        elif step > total - f.tfinal:
            assert all(torch.equal(before[p], m.adapter.rank_mask) for p, m in modules.items())
    # The known answer: the budget of 8 goes to the most important matrices, m3's 6 ranks then m2's.
    assert alloc.ranks() == {"m0": 0, "m1": 0, "m2": 2, "m3": 6}


def test_adalora_merges_exactly_and_drops_pruned_triplets():
    modules = svd_adapters(1, 5, seed=4)
    layer = modules["m0"]
    layer.adapter.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    x = torch.randn(3, 10)
    merged = layer.merged()
    assert rel(merged(x), layer(x).detach()) < 1e-6
    A, B = layer.adapter.lora_factors()
    assert A.shape == (3, 10) and B.shape == (8, 3)
    assert rel(B @ A, layer.adapter.delta_weight()) < 1e-12


# ---------------------------------------------------------------------------------------------
# Through the trainer

#: AdaLoRA from rank 4 to 2 per matrix, pruned on every step from the second: a budget in a few steps.
ADALORA_SCHEDULE = (
    "finetune.init_rank=4",
    "finetune.target_rank=2",
    "finetune.tinit=1",
    "finetune.tfinal=2",
    "finetune.delta_t=1",
)


@pytest.mark.parametrize("method", ["lora", "adalora", "adamole"])
def test_every_method_starts_as_the_identity(tmp_path, data_dir, method):  # noqa: F811
    _, model, base = adapted_by(method, tmp_path, data_dir)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


def test_adalora_and_adamole_train_through_the_trainer_and_log_ranks_and_expert_use(tmp_path, data_dir):  # noqa: F811
    base_run, base = make_base_run(tmp_path)
    ada = ft_config(
        base_run,
        tmp_path / "ada",
        data_dir,
        "finetune.method=adalora",
        "train.steps=8",
        *ADALORA_SCHEDULE,
        "finetune.target_components=[q, v]",
        "optim.lr=1e-2",
    )
    trainer.train(ada)
    recs = read_metrics(ada.train.run_dir, "train")
    for r in recs:
        assert r["adalora/total_rank"] <= r["adalora/budget"]
        assert sum(v for k, v in r.items() if k.startswith("rank/")) == r["adalora/total_rank"]
    assert recs[0]["adalora/total_rank"] == 16 and recs[-1]["adalora/total_rank"] == 8
    mole = ft_config(
        base_run,
        tmp_path / "mole",
        data_dir,
        "finetune.method=adamole",
        "train.steps=3",
        "finetune.experts=3",
        "finetune.target_components=[q, ffn_out]",
        "optim.lr=1e-2",
    )
    trainer.train(mole)
    rec = read_metrics(mole.train.run_dir, "train")[-1]
    active = [v for k, v in rec.items() if k.startswith("experts_active/")]
    assert len(active) == 4 and all(1 <= v <= 3 for v in active)
    assert {k.split("/")[0] for k in rec if k.startswith("lr/")} == {"lr"}
    assert {k for k in rec if k.startswith("lr/")} == {
        f"lr/{t}.{p}"
        for t in ("q", "ffn_out")
        for p in ("experts_A", "experts_B", "gate", "threshold", "threshold_bias")
    }


@pytest.mark.parametrize(
    "method,extra",
    [
        ("adalora", ADALORA_SCHEDULE),
        ("adamole", ("finetune.experts=3",)),
    ],
)
def test_adaptive_fine_tunes_are_unchanged_by_activation_checkpointing(tmp_path, data_dir, method, extra):  # noqa: F811
    """The recomputed forward must not count twice in what the adapters accumulate in theirs
    (AdaLoRA's importance from the gradients, AdaMoLE's expert use): losses, ranks and expert
    counts equal the run without checkpointing."""
    base_run, _ = make_base_run(tmp_path)
    logged = {}
    for mode in ("none", "full"):
        cfg = ft_config(
            base_run,
            tmp_path / mode,
            data_dir,
            f"finetune.method={method}",
            *extra,
            "train.steps=6",
            "train.log_every=1",
            "finetune.target_components=[q, v, ffn_out]",
            "optim.lr=1e-2",
            f"train.activation_checkpointing={mode}",
        )
        trainer.train(cfg)
        kept = ("loss", "rank/", "adalora/", "experts_active/")
        logged[mode] = [
            {k: v for k, v in r.items() if k.startswith(kept)}
            for r in read_metrics(cfg.train.run_dir, "train")
        ]
    assert len(logged["none"]) == 6 and logged["none"] == logged["full"]
    assert any(k != "loss" for k in logged["none"][-1])  # the adapter's own counters are compared too


def test_adalora_in_bf16_keeps_its_budget_and_tracks_the_fp32_losses(tmp_path, data_dir):  # noqa: F811
    """bf16 (the GPU default; DeepSpeed's bf16 path here on CPU) casts the adapters with the
    model: AdaLoRA's importance and masks must still hold the budget at every step and reach
    the target rank, and the losses stay near fp32's."""
    base_run, _ = make_base_run(tmp_path)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = ft_config(
            base_run,
            tmp_path / precision,
            data_dir,
            "finetune.method=adalora",
            *ADALORA_SCHEDULE,
            "finetune.target_components=[q, v]",
            "train.steps=8",
            "train.log_every=1",
            "optim.lr=1e-2",
            f"train.precision={precision}",
        )
        trainer.train(cfg)
        recs = read_metrics(cfg.train.run_dir, "train")
        assert all(r["adalora/total_rank"] <= r["adalora/budget"] for r in recs)
        assert recs[-1]["adalora/total_rank"] == 8
        losses[precision] = torch.tensor([r["loss"] for r in recs])
    assert torch.isfinite(losses["bf16"]).all() and len(losses["bf16"]) == 8
    gap = (losses["bf16"] - losses["fp32"]).abs().max()
    assert 0 < gap < 0.05 * losses["fp32"].abs().max()  # > 0: the run did train in bf16
