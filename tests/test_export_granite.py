"""`mupfast export --format granite`: the μP model as itself in transformers, and trainable there as μP."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from mupfast.cli import main
from mupfast.errors import ConfigError
from mupfast.export import export_run
from mupfast.export.generate import generate
from mupfast.optim.optimizer import build_optimizer
from tests.test_export import LLAMA, MUP, make_run, width

transformers = pytest.importorskip("transformers")

CASES = {
    "mup-untied-gqa": [*LLAMA, *MUP, *width(64), "model.num_kv_heads=2", "model.mup_base_num_kv_heads=2"],
    "completep-tied-bias": [
        *LLAMA,
        *MUP,
        *width(64),
        "model.parametrization=completep",
        "model.mup_base_num_layers=1",
        "model.depth_alpha=0.5",
        "model.tie_embeddings=true",
        "model.bias=true",
    ],
}
# No clipping and a constant lr: one AdamW step is then the same update in either framework.
TRAIN = [
    "clip.max_norm=0",
    "optim.lr=2e-2",
    "optim.weight_decay=0.1",
    "schedule.kind=constant",
    "train.steps=10",
]


def _export(tmp_path, case: str):
    cfg, run_dir, model = make_run(tmp_path, *CASES[case], *TRAIN)
    out = tmp_path / "granite"
    export_run(run_dir, out, fmt="granite")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).float()
    return cfg, run_dir, model, hf, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_granite_with_our_logits(tmp_path, case):
    cfg, _, model, hf, out = _export(tmp_path, case)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "granite" and type(hf).__name__ == "GraniteForCausalLM"
    assert config["logits_scaling"] == pytest.approx(1 / model.readout.logit_scale)
    assert config["residual_multiplier"] == pytest.approx(float(model.blocks[0].attn_branch_scale))
    if case.startswith("completep"):
        assert config["residual_multiplier"] != 1.0  # CompleteP's branch multiplier, unfolded
    # Unfolded: the weights are the trained ones, bit for bit.
    hf_params = dict(hf.named_parameters())
    assert torch.equal(hf_params["model.embed_tokens.weight"], model.tok_emb.weight)
    assert torch.equal(hf_params["model.layers.0.self_attn.q_proj.weight"], model.blocks[0].attn.q.weight)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (theirs - ours).abs().max().item() <= 1e-5 * (1 + ours.abs().max().item())


def test_greedy_continuation_in_transformers_equals_mupfast_generate(tmp_path):
    _, run_dir, _, hf, _ = _export(tmp_path, "mup-untied-gqa")
    ours = generate(str(run_dir), "def f(x):", max_new_tokens=12, temperature=0.0)
    prompt = torch.tensor([ours.prompt_ids])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert theirs[0, prompt.shape[1] :].tolist() == ours.new_ids


def _train(model, logits_of, optimizer, batches) -> list[float]:
    losses = []
    for x in batches:
        logits = logits_of(model, x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _groups_json_optimizer(hf, out, *, mup: bool = True) -> torch.optim.Optimizer:
    """torch's AdamW over the transformers model, as docs/export.md shows, from optimizer_groups.json."""
    spec = json.loads((out / "optimizer_groups.json").read_text())
    params = dict(hf.named_parameters())
    groups = [
        {
            "params": [params[n] for n in g["params"]],
            "lr": spec["base_lr"] * (g["lr_mult"] if mup else 1.0),
            "weight_decay": spec["base_weight_decay"] * (g["wd_mult"] if mup else 1.0),
        }
        for g in spec["groups"]
    ]
    assert sorted(p for g in spec["groups"] for p in g["params"]) == sorted(params)  # every parameter, once
    return torch.optim.AdamW(groups, betas=tuple(spec["betas"]), eps=spec["eps"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_in_transformers_with_the_groups_follows_mupfast(tmp_path, case):
    cfg, _, model, hf, out = _export(tmp_path, case)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, cfg.model.vocab_size, (4, 24), generator=gen) for _ in range(4)]
    model.train()
    ours = _train(model, lambda m, x: m(x), build_optimizer(model, cfg), batches)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).float()
    theirs = _train(hf, lambda m, x: m(x).logits, _groups_json_optimizer(hf, out), batches)
    assert theirs == pytest.approx(ours, rel=1e-5)
    # The same weights trained with one lr for every group (SP's habit) leave μP's path at once.
    plain = _train(fresh, lambda m, x: m(x).logits, _groups_json_optimizer(fresh, out, mup=False), batches)
    assert abs(plain[-1] - ours[-1]) > 1e-3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.parametrization=hyperp"], "model.parametrization: hyperp"),
        (["model.norm=layernorm", "model.position=learned", "model.mlp=gelu"], "model.position: learned"),
        (["model.moe_experts=4", "model.moe_top_k=2"], "model.moe_experts"),
    ],
)
def test_what_granite_cannot_express_is_a_one_line_error(tmp_path, overrides, key, capsys):
    base = [o for o in CASES["mup-untied-gqa"] if not o.startswith(("model.num_kv", "model.mup_base_num_kv"))]
    _, run_dir, _ = make_run(tmp_path, *base, *overrides)
    argv = ["export", "--run", str(run_dir), "--out", str(tmp_path / "g"), "--format", "granite"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}") and "\n" not in err
    with pytest.raises(ConfigError):
        export_run(run_dir, tmp_path / "g2", fmt="granite")
