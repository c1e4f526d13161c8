"""Parameter groups, the clip+AdamW optimizer, and lr ratios under every schedule."""

import copy

import pytest
import torch

from mupfast.model import build_model
from mupfast.optim import ClipAdamW, build_optimizer, build_param_groups
from mupfast.optim.schedules import GroupLR, build_schedule
from mupfast.parametrization import hyperp_transfer
from tests.helpers import tiny_config

MUP = ["model.hidden_size=64", "model.mup_base_hidden_size=16", "model.mup_base_filter_size=32"]


def test_one_group_per_component_with_multipliers():
    cfg = tiny_config(
        *MUP, "optim.lr=0.01", "optim.weight_decay=0.1", "clip.component_max_norm={embedding: 0.5}"
    )
    groups = build_param_groups(build_model(cfg.model), cfg)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"embedding", "q", "k", "v", "o", "ffn_in", "ffn_out", "norm", "final_norm", "readout"}
    assert all("lr" not in g for g in groups)  # only the optimizer's GroupLR writes lrs
    lrs = {g["name"]: g["lr"] for g in build_optimizer(build_model(cfg.model), cfg).param_groups}
    assert lrs["q"] == pytest.approx(0.01 / 4) and by["q"]["weight_decay"] == pytest.approx(0.4)
    assert by["embedding"]["max_grad_norm"] == 0.5 and by["q"]["max_grad_norm"] == 1.0
    assert by["norm"]["weight_decay"] == 0.0
    layered = build_param_groups(
        build_model(cfg.model), tiny_config(*MUP, "clip.granularity=layer_component")
    )
    assert {"layer0.q", "layer1.q", "embedding", "readout"} <= {g["name"] for g in layered}


def test_group_lrs_are_written_by_the_optimizers_group_lr_alone():
    cfg = tiny_config(*MUP, "optim.lr=0.01", "schedule.warmup_steps=4", "train.steps=20")
    model = build_model(cfg.model)
    bare = ClipAdamW(build_param_groups(model, cfg))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="no lr: a GroupLR"):
        bare.step()
    opt = build_optimizer(model, cfg)
    fn = build_schedule(cfg.schedule, cfg.train.steps)
    for t in range(3):
        assert opt.lr_schedule.last_step == t
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.01 * fn(t) * g["lr_mult"], rel=1e-12)
        opt.lr_schedule.step()


def test_hyperp_base_lr_counts_every_ranks_tokens():
    cfg = tiny_config("model.parametrization=hyperp", "schedule.kind=constant")
    model = build_model(cfg.model)
    for world in (1, 4):
        opt = build_optimizer(model, cfg, world_size=world)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([hyperp_transfer(cfg, world)["lr"]] * len(lrs), rel=1e-12)
    # 4 ranks: B and T × 4, so η × √4 · 4^-0.32
    assert hyperp_transfer(cfg, 4)["lr"] == pytest.approx(hyperp_transfer(cfg, 1)["lr"] * 4**0.5 * 4**-0.32)


def test_unknown_component_in_clip_overrides_is_an_error():
    cfg = tiny_config("clip.component_max_norm={embeding: 0.5}")
    with pytest.raises(ValueError, match="embeding"):
        build_param_groups(build_model(cfg.model), cfg)


def _reference_step(model, cfg, opt_ref):
    """torch's own pieces: per-group clip_grad_norm_ then AdamW with the group's lr and wd."""
    for g in opt_ref.param_groups:
        torch.nn.utils.clip_grad_norm_(g["params"], g["max_grad_norm"])
    opt_ref.step()


@pytest.mark.parametrize("spike", [False, True])
def test_clip_adamw_matches_torch_clip_grad_norm_plus_adamw(spike):
    cfg = tiny_config(
        *MUP, "optim.lr=0.01", "optim.weight_decay=0.1", "clip.max_norm=0.05", "optim.backend=torch"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, cfg)
    groups = build_param_groups(ref_model, cfg)
    for g in groups:  # the reference's lrs, from the multipliers (ours: set by the optimizer's GroupLR)
        g["lr"] = cfg.optim.lr * g["lr_mult"]
    opt_ref = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=False
    )
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    for step in range(4):
        for m in (model, ref_model):
            m.zero_grad()
            m(tokens[:, :-1], tokens[:, 1:]).backward()
            if spike and step == 2:
                m.tok_emb.weight.grad.mul_(1e4)
        opt.step()
        _reference_step(ref_model, cfg, opt_ref)
        assert opt.last_clip_coefs["embedding"].item() < (1e-3 if spike and step == 2 else 1.01)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_a_spiking_component_is_clipped_while_the_others_are_untouched():
    cfg = tiny_config(*MUP, "optim.lr=0.01", "clip.max_norm=1.0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    opts = [build_optimizer(m, cfg) for m in (model, twin)]
    for m, opt, spike in ((model, opts[0], True), (twin, opts[1], False)):
        m(tokens[:, :-1], tokens[:, 1:]).backward()
        if spike:
            m.blocks[0].attn.q.weight.grad.mul_(1e6)
        opt.step()
    assert opts[0].last_clip_coefs["q"].item() < 0.1
    assert all(c.item() == 1.0 for c in opts[1].last_clip_coefs.values())
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if ".attn.q." in n:
            assert not torch.equal(p, q)
        else:
            assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "parametrization, backend", [("mup", "torch"), ("mup", "triton"), ("hyperp", "torch")]
)
def test_skipped_step_changes_nothing(parametrization, backend):
    """A skip known on the host returns at once; one decided on the device (a flag tensor, no host
    sync) leaves parameters, moments and step counts as they were, and the next step is the step
    the skipped one would have been."""
    cfg = tiny_config(f"model.parametrization={parametrization}", f"optim.backend={backend}")
    tokens = torch.randint(0, 256, (2, 9))

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg.model)
        return model, build_optimizer(model, cfg)

    def step(model, opt, skip):
        model.zero_grad()
        model(tokens).sum().backward()
        opt.skip_step = skip
        opt.step()
        opt.skip_step = False

    model, opt = fresh()
    before = copy.deepcopy(model.state_dict())
    step(model, opt, True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt.state
    step(model, opt, torch.tensor(1.0))  # the first update, skipped on the device
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    step(model, opt, torch.tensor(0.0))
    step(model, opt, torch.tensor(1.0))
    after_one = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])
    step(model, opt, torch.tensor(0.0))

    reference, ref_opt = fresh()  # the same two real updates, none skipped
    step(reference, ref_opt, False)
    one = copy.deepcopy(ref_opt.state_dict()["state"])
    assert all(torch.equal(v, after_one[0][k]) for k, v in reference.state_dict().items())
    for i, st in one.items():
        for key, value in st.items():
            assert torch.equal(value, after_one[1][i][key]), (i, key)
    step(reference, ref_opt, False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd", "cyclic_cosine", "cyclic_wsd"])
def test_group_lr_ratios_survive_every_schedule_and_a_reload(kind):
    cfg = tiny_config(*MUP, f"schedule.kind={kind}", "schedule.warmup_steps=3", "schedule.cycle_steps=10")
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    fn = build_schedule(cfg.schedule, 30)
    sched = GroupLR(opt, cfg.optim.lr, fn)
    for step in range(30):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["q"] == pytest.approx(lrs["embedding"] / 4)
        assert lrs["embedding"] == pytest.approx(cfg.optim.lr * fn(step))
        sched.step()
        if step == 12:  # a resume: saved lrs are garbage, the scheduler recomputes them from lr_mult
            state = sched.state_dict()
            for g in opt.param_groups:
                g["lr"] = 123.0
            sched = GroupLR(opt, cfg.optim.lr, fn)
            sched.load_state_dict(state)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("key", ["lr", "max_grad_norm", "betas", "eps", "weight_decay"])
def test_a_group_hyperparameter_changed_between_steps_applies_to_the_next_update(key, backend):
    """PBT's explore writes new values into param_groups between steps: the next update uses each
    group's own new value (reference: per-group clip_grad_norm_ + torch AdamW with the same change)."""
    cfg = tiny_config(
        *MUP, "optim.lr=0.01", "optim.weight_decay=0.1", "clip.max_norm=0.05", f"optim.backend={backend}"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ref_model, unchanged_model = copy.deepcopy(model), copy.deepcopy(model)
    opt, unchanged = build_optimizer(model, cfg), build_optimizer(unchanged_model, cfg)
    groups = build_param_groups(ref_model, cfg)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_mult"]
    opt_ref = torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, foreach=False
    )
    new = {"max_grad_norm": 1e-5, "betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.7}
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    for step in range(3):
        if step == 2:  # the change, in two groups, before the third update
            for o in (opt, opt_ref):
                for g in o.param_groups:
                    if g["name"] in ("q", "ffn_out"):
                        if key == "lr":
                            g["lr"] = g["lr"] * 3.0
                        else:
                            g[key] = new[key]
            if key == "lr":  # ours: through GroupLR's base, the one writer of lrs, for one group
                opt.lr_schedule.apply()
                for g in opt.param_groups:
                    if g["name"] in ("q", "ffn_out"):
                        g["lr"] *= 3.0
        for m in (model, ref_model, unchanged_model):
            m.zero_grad()
            m(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        unchanged.step()
        _reference_step(ref_model, cfg, opt_ref)
    for (n, p), q, u in zip(model.named_parameters(), ref_model.parameters(), unchanged_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        if ".attn.q." in n:
            assert not torch.allclose(p, u, rtol=0, atol=1e-7), n  # the change did change the update


def test_the_configs_hyperparameters_replace_a_loaded_state_dicts():
    """A checkpoint restores the saved state; the groups keep the config's hyperparameters, and the
    trainer's apply_hyperparameters after the load changes nothing."""
    from mupfast.optim.optimizer import apply_hyperparameters

    cfg = tiny_config(*MUP, "optim.backend=torch")
    model = build_model(cfg.model)
    saved = build_optimizer(model, cfg).state_dict()
    changed = tiny_config(
        *MUP, "optim.backend=torch", "optim.beta1=0.5", "optim.eps=1e-4", "clip.max_norm=0.3"
    )
    opt = build_optimizer(model, changed)
    opt.load_state_dict(saved)
    assert saved["param_groups"][0]["betas"][0] == cfg.optim.beta1
    for g in opt.param_groups:
        assert (g["betas"][0], g["eps"], g["max_grad_norm"]) == (0.5, 1e-4, 0.3), g["name"]
    apply_hyperparameters(opt, opt.configured)
    for g in opt.param_groups:
        assert (g["betas"][0], g["eps"], g["max_grad_norm"]) == (0.5, 1e-4, 0.3), g["name"]
