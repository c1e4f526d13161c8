"""SqrtGate MoE (issue 10, point 4): the batched layer against a token-by-token float64 reference,
output RMS across expert granularities, the balance loss and router Z, its μP rules and optimizer
groups, and training through the real trainer (μP) and on the sphere (hyperp)."""

import copy
import math
from dataclasses import replace

import pytest
import torch

import mupfast.train as trainer
from mupfast.errors import ConfigError
from mupfast.explain import format_table, rules_table
from mupfast.model import build_model
from mupfast.model.moe import SqrtGateMoE, reference_moe
from mupfast.optim import build_optimizer
from mupfast.parametrization import COMPONENTS, multipliers
from mupfast.rundir import read_metrics
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MOE = ["model.moe_experts=4", "model.moe_top_k=2"]


def _moe_layer(*overrides: str, dtype=torch.float64) -> tuple[SqrtGateMoE, object]:
    """The MoE of a one-block model, initialised by the parametrization rules."""
    cfg = tiny_config("model.num_layers=1", *MOE, *overrides)
    model = build_model(cfg.model).to(dtype)
    return model.blocks[0].mlp, cfg


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["model.moe_shared_expert=true", "model.moe_shared_p=0.3"],
        ["model.mlp=gelu", "model.bias=true", "model.moe_top_k=3", "model.moe_granularity=2"],
        ["model.moe_experts=6", "model.moe_top_k=1"],
    ],
)
def test_batched_moe_matches_a_token_by_token_float64_reference_forward_and_backward(opts):
    torch.manual_seed(0)
    moe, _ = _moe_layer(*opts)
    with torch.no_grad():  # a livelier router than at init, so top-k picks differ from token to token
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(3, 7, moe.router.in_features, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    ref = reference_moe(moe, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()])
    assert (out - ref).norm() / ref.norm() < 1e-12
    for (name, _), g, r in zip([("x", x), *moe.named_parameters()], grads, ref_grads):
        assert (g - r).norm() <= 1e-12 * r.norm() + 1e-300, name
    # every expert has a gradient, even one that got no token
    assert all(g is not None for g in grads)


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["model.moe_shared_expert=true"],
        ["model.mlp=gelu", "model.bias=true", "model.moe_top_k=3", "model.moe_granularity=2"],
        ["model.moe_experts=6", "model.moe_top_k=1"],
    ],
)
def test_grouped_dispatch_matches_the_float64_reference_forward_and_backward(opts):
    """grouped_mm runs in fp32 at most, so the fp32 layer is compared with its float64 copy."""
    torch.manual_seed(0)
    moe, _ = _moe_layer("model.moe_dispatch=grouped", *opts, dtype=torch.float32)
    assert moe.grouped
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    moe64 = copy.deepcopy(moe).double()
    x = torch.randn(4, 9, moe.router.in_features, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    out = moe(x32)
    grads = torch.autograd.grad(out.double().square().sum(), [x32, *moe.parameters()])
    x64 = x.clone().requires_grad_()
    ref = reference_moe(moe64, x64)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x64, *moe64.parameters()])
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    for (name, _), g, r in zip([("x", x32), *moe.named_parameters()], grads, ref_grads):
        assert (g.double() - r).norm() <= 1e-4 * r.norm() + 1e-12, name
    # With expert 0 given no row: grouped and loop agree, and expert 0 gets an exact zero gradient.
    x2 = x32.detach().reshape(-1, x32.shape[-1])
    idx = torch.randint(1, moe.num_experts, (x2.shape[0], moe.top_k))
    w = torch.rand(idx.shape)
    params = dict(moe.named_parameters())
    results = {}
    for grouped in (True, False):
        moe.grouped = grouped
        y = moe._dispatch(x2, idx, w)
        results[grouped] = (
            y,
            torch.autograd.grad(y.square().sum(), list(params.values()), allow_unused=True),
        )
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(params.items(), *(results[b][1] for b in (True, False))):
        if name.startswith("experts."):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), name
    assert results[True][1][list(params).index("experts.0.up.weight")].abs().max() == 0


@pytest.mark.parametrize("parametrization", ["mup", "hyperp"])
def test_grouped_and_loop_dispatch_train_alike(parametrization):
    losses = {}
    for dispatch in ("loop", "grouped"):
        cfg = tiny_config(*MOE, f"model.parametrization={parametrization}", f"model.moe_dispatch={dispatch}")
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = build_optimizer(model, cfg)
        tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
        losses[dispatch] = []
        for _ in range(4):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[dispatch].append(loss.item())
    assert losses["grouped"] == pytest.approx(losses["loop"], rel=1e-4)
    assert losses["loop"][-1] < losses["loop"][0]


def test_moe_passes_gradcheck_on_a_tiny_case():
    torch.manual_seed(1)
    moe, _ = _moe_layer(
        "model.hidden_size=8", "model.num_heads=2", "model.filter_size=8", "model.moe_experts=3"
    )
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    names = [n for n, _ in moe.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in moe.parameters()]
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(moe, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def _rms_across_granularities(parametrization: str, sqrt_gate: bool = True) -> dict[int, float]:
    """Output RMS at init on unit-RMS input, granularity G: E = 4G experts, top-k = G, size filter/G."""
    out = {}
    for G in (1, 2, 4, 8):
        vals = []
        for seed in range(3):
            torch.manual_seed(seed)
            moe, _ = _moe_layer(
                f"model.parametrization={parametrization}",
                "model.hidden_size=64",
                "model.num_heads=2",
                "model.filter_size=256",
                f"model.moe_granularity={G}",
                f"model.moe_experts={4 * G}",
                f"model.moe_top_k={G}",
                dtype=torch.float32,
            )
            moe.sqrt_gate = sqrt_gate
            x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(100 + seed))
            with torch.no_grad():
                vals.append(moe(x).square().mean().sqrt().item())
        out[G] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("parametrization", ["mup", "hyperp"])
def test_sqrt_gate_output_rms_stays_constant_across_expert_granularities(parametrization):
    rms = _rms_across_granularities(parametrization)
    assert max(rms.values()) / min(rms.values()) < 1.03, rms
    # The test can fail: the usual g-weighted gate loses RMS as ~1/√k with finer experts...
    plain = _rms_across_granularities(parametrization, sqrt_gate=False)
    assert plain[8] / plain[1] < 0.5, plain
    assert plain[8] / plain[1] == pytest.approx(1 / math.sqrt(8), rel=0.15)


def test_sp_expert_init_ignores_fan_in_so_its_rms_drops_with_granularity():
    """The μP expert rule (init from the expert's own fan-in) is what keeps the RMS: SP's fixed σ loses √G."""
    sp = _rms_across_granularities("sp")
    assert sp[8] / sp[1] == pytest.approx(1 / math.sqrt(8), rel=0.15)


def test_balance_loss_is_e_sum_f_p_and_one_for_a_uniform_router():
    torch.manual_seed(2)
    moe, cfg = _moe_layer("model.moe_experts=5", "model.moe_top_k=2")
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    x = torch.randn(64, moe.router.in_features, dtype=torch.float64)
    moe(x)
    logits = moe.router_scale * x @ moe.router.weight.t()
    idx = logits.topk(2, -1).indices
    f = torch.stack([(idx == i).sum() for i in range(5)]).double() / idx.numel()
    P = logits.softmax(-1).mean(0)
    assert moe.aux_loss.item() == pytest.approx(5 * (f * P).sum().item(), rel=1e-12)
    assert moe.aux_loss.item() > 1.0  # this router is not balanced
    assert moe.router_z.item() == pytest.approx(logits.logsumexp(-1).square().mean().item(), rel=1e-12)
    # A uniform router (all probabilities 1/E) gives the minimum, 1, whatever the top-k picks.
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-12)
    assert moe.router_z.item() == pytest.approx(math.log(5) ** 2, rel=1e-12)


def test_training_loss_adds_the_aux_losses_and_eval_loss_is_the_pure_lm_loss():
    cfg = tiny_config(*MOE, "model.moe_aux_loss_coef=0.1", "model.moe_router_z_coef=0.01")
    torch.manual_seed(3)
    model = build_model(cfg.model)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    stats = model.stability_stats()
    moes = [b.mlp for b in model.blocks]
    expected = stats["lm_loss"] + 0.1 * stats["moe_aux_loss"] + 0.01 * stats["router_z"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["moe_aux_loss"].item() == pytest.approx(
        torch.stack([m.stats["moe_aux_loss"] for m in moes]).mean().item()
    )
    assert {"router_z", "moe_max_vio", "attn_lse_sq_mean"} <= set(stats)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.blocks[0].mlp.router.weight.grad.norm() > 0
    model.eval()
    with torch.no_grad():
        assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(stats["lm_loss"].item(), rel=1e-6)


def test_moe_every_places_moe_blocks():
    cfg = tiny_config(*MOE, "model.num_layers=4", "model.moe_every=2")
    model = build_model(cfg.model)
    assert [isinstance(b.mlp, SqrtGateMoE) for b in model.blocks] == [False, True, False, True]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.moe_top_k=5", "model.moe_top_k"),
        ("model.moe_granularity=3", "model.moe_granularity"),
        ("model.moe_shared_p=1.5", "model.moe_shared_p"),
        ("model.moe_aux_loss_coef=-1", "model.moe_aux_loss_coef"),
        ("model.moe_router_z_coef=-1", "model.moe_router_z_coef"),
        ("model.moe_every=3", "model.moe_every"),
    ],
)
def test_bad_moe_keys_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config(*MOE, override)


def test_grouped_dispatch_needs_aligned_widths_and_whole_weights():
    with pytest.raises(ConfigError, match="model.moe_dispatch: grouped needs .* multiples of 8 .got 32, 4"):
        tiny_config(*MOE, "model.moe_dispatch=grouped", "model.moe_granularity=16")
    with pytest.raises(ConfigError, match="model.moe_dispatch: grouped does not run under zero.stage 3"):
        tiny_config(*MOE, "model.moe_dispatch=grouped", "zero.stage=3")


def test_mup_rules_for_experts_and_router():
    """Experts: the FFN rules with the expert's own fan-in; router: output-like (σ, lr × 1, logits × 1/m)."""
    base = ["model.mup_base_hidden_size=16", "model.mup_base_filter_size=32", "model.moe_granularity=2"]
    cfg = tiny_config(*MOE, *base, "model.hidden_size=64", "model.filter_size=128")
    m, sigma, out = 4.0, cfg.model.init_std, 1 / math.sqrt(2 * cfg.model.num_layers)
    m_e = (128 / 2) / 32  # expert fan-in over the base filter size
    by = {r.name: r for r in rules_table(cfg.model)}
    r_in, r_out = by["blocks.1.mlp.experts.3.gate.weight"], by["blocks.1.mlp.experts.3.down.weight"]
    assert (r_in.component, r_in.lr_mult, r_in.wd_mult) == ("expert_in", 1 / m, m)
    assert r_in.init_std == pytest.approx(sigma / math.sqrt(m))
    assert (r_out.component, r_out.shape, r_out.lr_mult, r_out.wd_mult) == (
        "expert_out",
        (64, 64),
        1 / m_e,
        m_e,
    )
    assert r_out.init_std == pytest.approx(sigma / math.sqrt(m_e) * out)
    router = by["blocks.0.mlp.router.weight"]
    assert (router.component, router.shape, router.init_std, router.lr_mult) == (
        "router",
        (4, 64),
        sigma,
        1.0,
    )
    assert router.forward_mult == multipliers(cfg.model).router_scale == 1 / m
    moe = build_model(cfg.model).blocks[0].mlp
    x = torch.randn(5, 64)
    torch.testing.assert_close(moe.router_logits(x), x @ moe.router.weight.t() / m)
    # At granularity 1 and the base widths an expert is exactly the dense FFN it replaces.
    dense = {r.name: r for r in rules_table(tiny_config(*base[:2]).model)}
    one = {r.name: r for r in rules_table(tiny_config(*MOE, *base[:2]).model)}
    for ours, theirs in [("experts.0.up", "up"), ("experts.0.down", "down")]:
        a, b = one[f"blocks.0.mlp.{ours}.weight"], dense[f"blocks.0.mlp.{theirs}.weight"]
        assert (a.init_std, a.lr_mult, a.wd_mult, a.shape) == (b.init_std, b.lr_mult, b.wd_mult, b.shape)


def test_experts_and_router_get_their_own_optimizer_groups_and_explain_rows():
    cfg = tiny_config(
        *MOE,
        "model.moe_shared_expert=true",
        "model.hidden_size=64",
        "model.mup_base_hidden_size=16",
        "model.mup_base_filter_size=64",
        "clip.component_max_norm={router: 0.5}",
    )
    assert {"router", "expert_in", "expert_out"} <= set(COMPONENTS)
    model = build_model(cfg.model)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["router"]["lr_mult"] == 1.0 and groups["router"]["max_grad_norm"] == 0.5
    assert groups["expert_in"]["lr_mult"] == pytest.approx(1 / 4)
    assert groups["expert_out"]["lr_mult"] == 1.0  # m_f = 1: filter size at its base
    n_in = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n or ".up." in n)
    assert sum(p.numel() for p in groups["expert_in"]["params"]) == n_in  # shared expert included
    assert all(p.ndim == 2 for g in ("router", "expert_in", "expert_out") for p in groups[g]["params"])
    rules = rules_table(cfg.model)
    text = format_table(cfg.model, rules)
    assert "blocks.0.mlp.router.weight" in text and "expert_out" in text
    # One row per layer and expert matrix: experts whose rules agree share it, the shared one does not.
    E, L = cfg.model.moe_experts, cfg.model.num_layers
    assert sum(".experts." in r.name for r in rules) == 3 * E * L
    rows = [line.split()[0] for line in text.splitlines() if ".experts." in line]
    assert rows[:3] == [f"blocks.0.mlp.experts.[0-{E - 1}].{w}.weight" for w in ("gate", "up", "down")]
    assert len(rows) == 3 * L and "blocks.0.mlp.shared.down.weight" in text
    # Rules that differ keep their own rows.
    altered = [replace(r, lr_mult=9.0) if r.name == "blocks.0.mlp.experts.1.up.weight" else r for r in rules]
    text = format_table(cfg.model, altered)
    assert (
        "blocks.0.mlp.experts.1.up.weight" in text
        and f"experts.[0,{','.join(map(str, range(2, E)))}].up" in text
    )


def test_a_tiny_moe_model_learns_through_the_trainer(tmp_path):
    cfg = tiny_config(
        *MOE,
        "model.moe_shared_expert=true",
        "train.steps=30",
        "optim.lr=1e-2",
        "train.log_every=1",
        "train.eval_every=0",
        tmp_path=tmp_path,
    )
    result = trainer.train(cfg)
    assert result.train_losses[30] < result.train_losses[1] - 1.0
    rec = read_metrics(cfg.train.run_dir, "train")[-1]
    assert {"lr/router", "lr/expert_in", "lr/expert_out", "grad_norm/router"} <= set(rec)
    assert {"lm_loss", "moe_aux_loss", "router_z", "moe_max_vio", "attn_lse_sq_mean"} <= set(rec)
    assert rec["loss"] == pytest.approx(rec["lm_loss"] + 0.01 * rec["moe_aux_loss"], rel=1e-5)
    assert 1.0 <= rec["moe_aux_loss"] < 2.0


def test_hyperp_moe_trains_experts_and_router_on_their_spheres():
    cfg = tiny_config("model.parametrization=hyperp", *MOE, "model.moe_shared_expert=true")
    rules = rules_table(cfg.model)
    for r in rules:
        if r.component in ("router", "expert_in", "expert_out"):
            assert (r.optimizer, r.wd_mult, r.lr_mult) == ("muon_sphere", 0.0, 1.0), r.name
            assert r.init_std == pytest.approx(1 / math.sqrt(3 * r.shape[1])), r.name
    assert multipliers(cfg.model).router_scale == 1.0
    torch.manual_seed(5)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    moe_params = {n: p for n, p in model.named_parameters() if ".mlp." in n}
    radii = {n: p.detach().norm().item() for n, p in moe_params.items()}
    before = {n: p.detach().clone() for n, p in moe_params.items()}
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        tokens = torch.randint(0, 256, (4, 17), generator=gen)
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    for n, p in moe_params.items():
        assert p.detach().norm().item() == pytest.approx(radii[n], rel=1e-6), n
        assert not torch.equal(p.detach(), before[n]), n  # it moved, along the sphere


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "parametrization, dispatch", [("mup", "loop"), ("hyperp", "loop"), ("hyperp", "grouped")]
)
def test_two_rank_zero2_moe_matches_single_process(tmp_path, parametrization, dispatch):
    """Every expert runs (possibly on zero tokens) on every rank, so ZeRO's partitions line up."""
    from tests.test_train import _deepspeed_run

    base = [
        *MOE,
        f"model.parametrization={parametrization}",
        f"model.moe_dispatch={dispatch}",
        "model.moe_shared_expert=true",
        "train.log_every=1",
        "train.eval_every=0",
        "train.steps=4",
        "train.micro_batch_size=2",
        # one process with 2 accumulation steps sees one micro-batch at a time: count loads the same way
        "model.moe_balance_scope=micro_batch",
    ]
    single = trainer.train(tiny_config(*base, "train.grad_accum_steps=2", tmp_path=tmp_path / "single"))
    two = _deepspeed_run(tmp_path, "zero2", [*base, "zero.stage=2"], ranks=2)
    assert sorted(two) == list(range(1, 5))
    for step, loss in single.train_losses.items():
        assert two[step] == pytest.approx(loss, rel=2e-5), step


def _balance_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    moe, _ = _moe_layer()
    torch.manual_seed(1)
    x = torch.randn(world, 6, moe.router.in_features, dtype=torch.float64)
    moe.train()
    moe(x[rank : rank + 1])
    moe.aux_loss.backward()
    grad = moe.router.weight.grad.clone()
    dist.all_reduce(grad)  # what DeepSpeed's gradient averaging does
    torch.save({"aux": moe.aux_loss.detach(), "grad": grad / world}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_balance_loss_counts_loads_over_every_data_parallel_rank(tmp_path):
    """Two ranks with half the tokens each: loads counted over both, gradient equal to the whole batch's."""
    import torch.multiprocessing as mp

    mp.spawn(_balance_rank, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    moe, _ = _moe_layer()  # same seed, same weights as each rank's
    torch.manual_seed(1)
    x = torch.randn(2, 6, moe.router.in_features, dtype=torch.float64)
    moe.train()
    moe(x.reshape(1, 12, -1))
    moe.aux_loss.backward()
    torch.testing.assert_close(got[0]["grad"], moe.router.weight.grad)
    torch.testing.assert_close(got[1]["grad"], moe.router.weight.grad)
    assert (got[0]["aux"] + got[1]["aux"]) / 2 == pytest.approx(moe.aux_loss.item(), rel=1e-12)
    # per-rank counting would differ: each rank's own loads against its own probabilities
    torch.manual_seed(0)
    local = _moe_layer("model.moe_balance_scope=micro_batch")[0]
    local.train()
    local(x[0:1])
    assert local.aux_loss.item() != pytest.approx(got[0]["aux"].item(), rel=1e-6)
