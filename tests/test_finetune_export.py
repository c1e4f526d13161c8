"""A fine-tuned run's export: adapters merged into the weights give the adapted model's logits
through `transformers` (fp32, 1e-4), and `--adapters-only` writes a folder PEFT loads onto the base
run's export with the same logits."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import pytest
import torch
import yaml

from mupfast.cli import main
from mupfast.errors import ConfigError
from mupfast.export import export_run
from mupfast.finetune.adapters import attach_adapters
from mupfast.finetune.attach import load_base_weights
from mupfast.finetune.finetune import finetune_config
from mupfast.model import build_model
from tests.helpers import tiny_config

# μP multipliers away from 1 (m = 2), as in test_export: a missing fold factor shows far above 1e-4.
MUP = [
    "model.parametrization=mup",
    "model.mup_base_hidden_size=32",
    "model.mup_base_filter_size=64",
    "model.hidden_size=64",
    "model.filter_size=128",
    "model.num_heads=4",
    "model.embeddings_scale=2.5",
    "model.output_logits_alpha=3.0",
    "model.attention_logits_alpha=1.7",
    "model.init_std=0.4",
    "model.embedding_init_std=1.0",
    "model.output_init_std=0.2",
]
LAYOUTS = {
    "llama": [
        "model.norm=rmsnorm",
        "model.position=rope",
        "model.mlp=swiglu",
        "model.num_kv_heads=2",
        "model.mup_base_num_kv_heads=2",
    ],
    "gpt2": ["model.norm=layernorm", "model.position=learned", "model.mlp=gelu", "model.bias=true"],
}
ALL = "[q, k, v, o, ffn_in, ffn_out]"


def save_run(run_dir, cfg, model, step=7):
    tag = run_dir / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save({"module": model.state_dict(), "step": step}, tag / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(tag.name)


def fine_tuned_run(tmp_path, layout: str, *overrides: str):
    """A base run and a fine-tuned run of it whose adapters are random (far from the identity)."""
    base_cfg = tiny_config(*MUP, *LAYOUTS[layout], tmp_path=tmp_path / "b")
    torch.manual_seed(0)
    base = build_model(base_cfg.model)
    save_run(tmp_path / "base", base_cfg, base)
    cfg = finetune_config(tmp_path / "base", None, [f"train.run_dir={tmp_path}/ft", *overrides])
    model = build_model(cfg.model)
    load_base_weights(model, cfg)
    attach_adapters(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                grown = any(k in n for k in ("lora_B", "lora_E", "experts_B"))  # zero at init
                p.normal_(0.0, 0.3 if grown or p.numel() == 1 else p.std().item())
        gen = torch.Generator().manual_seed(1)
        for n, b in model.named_buffers():
            if n.endswith("rank_mask"):  # AdaLoRA: some triplets pruned, one matrix entirely
                b.copy_((torch.rand(b.shape, generator=gen) < 0.6).float())
        masks = [b for n, b in model.named_buffers() if n.endswith("rank_mask")]
        if masks:
            masks[0].zero_()
    save_run(tmp_path / "ft", cfg, model)
    return cfg, model.eval()


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).float().eval()


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_merged_export_gives_the_adapted_models_logits(tmp_path, layout, method):
    cfg, model = fine_tuned_run(
        tmp_path, layout, f"finetune.method={method}", f"finetune.target_components={ALL}"
    )
    res = export_run(tmp_path / "ft", tmp_path / "hf")
    assert res.layout == layout
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours = model(tokens)
        plain = build_model(cfg.model)
        load_base_weights(plain, cfg)
        base_logits = plain.eval()(tokens)
        theirs = hf_model(tmp_path / "hf")(tokens).logits
    assert (ours - base_logits).abs().max() > 1.0  # the adapters matter at this scale
    assert (theirs - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
@pytest.mark.parametrize("method,targets", [("lora", ALL), ("lora", "[q, v]"), ("adalora", ALL)])
def test_adapters_only_is_a_peft_folder_for_the_base_runs_export(tmp_path, layout, method, targets):
    peft = pytest.importorskip("peft")
    _, model = fine_tuned_run(
        tmp_path, layout, f"finetune.method={method}", f"finetune.target_components={targets}"
    )
    assert main(["export", "--run", str(tmp_path / "base"), "--out", str(tmp_path / "hf_base")]) == 0
    assert (
        main(["export", "--run", str(tmp_path / "ft"), "--out", str(tmp_path / "ad"), "--adapters-only"]) == 0
    )
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "ad").iterdir()
    }
    tuned = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf_base"), str(tmp_path / "ad")).eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours, theirs = model(tokens), tuned(tokens).logits
    assert (theirs - ours).abs().max().item() < 1e-4
    record = json.loads((tmp_path / "ad" / "mupfast_export.json").read_text())
    assert record["method"] == method and record["base_run"] == str(tmp_path / "base")


def test_adapters_only_of_a_plain_run_is_an_error(tmp_path):
    fine_tuned_run(tmp_path, "llama", "finetune.method=lora")
    with pytest.raises(ConfigError, match="adapters-only"):
        export_run(tmp_path / "base", tmp_path / "ad", adapters_only=True)


def test_an_adamole_run_is_refused_by_export_with_the_reason(tmp_path, capsys):
    fine_tuned_run(tmp_path, "llama", "finetune.method=adamole")
    for extra in ([], ["--adapters-only"]):
        assert main(["export", "--run", str(tmp_path / "ft"), "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: finetune.method: adamole") and "per token" in err and "\n" not in err
