"""`mupfast export`: μP multipliers folded into the weights, loaded by `transformers` with equal logits."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import yaml

from mupfast.cli import main
from mupfast.errors import ConfigError
from mupfast.export import check_folding, export_run, fold_multipliers, layout_for, load_run
from mupfast.model import build_model
from tests.helpers import tiny_config

LLAMA = ["model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu"]
GPT2 = ["model.norm=layernorm", "model.position=learned", "model.mlp=gelu"]
# Every μP multiplier away from 1 (m = width/32 ≠ 1), and weights large enough that attention is far
# from uniform and the logits are O(1–10): a missing fold factor would show far above 1e-4.
MUP = [
    "model.parametrization=mup",
    "model.mup_base_hidden_size=32",
    "model.mup_base_filter_size=64",
    "model.embeddings_scale=2.5",
    "model.output_logits_alpha=3.0",
    "model.attention_logits_alpha=1.7",
    "model.init_std=0.4",
    "model.embedding_init_std=1.0",
    "model.output_init_std=0.2",
]


def width(w: int, heads: int = 4) -> list[str]:
    return [f"model.hidden_size={w}", f"model.filter_size={2 * w}", f"model.num_heads={heads}"]


def make_run(tmp_path, *overrides: str, name: str = "run", step: int = 7, seed: int = 0):
    """A run directory as the trainer leaves it (config.yaml, checkpoints/latest, the tag's model
    states with key "module"), holding a random model whose norm gains and biases are not 1 and 0."""
    cfg = tiny_config(*overrides, tmp_path=tmp_path / name)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    run_dir = tmp_path / name / "run"
    tag_dir = run_dir / "checkpoints" / f"step{step:08d}"
    tag_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.save({"module": model.state_dict(), "step": step}, tag_dir / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(tag_dir.name)
    return cfg, run_dir, model.eval()


def hf_logits(out_dir, tokens: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True)
    with torch.no_grad():
        return hf.float().eval()(tokens).logits


CASES = {
    "llama-w64-gqa-untied": [
        *LLAMA,
        *width(64),
        "model.num_kv_heads=2",
        "model.mup_base_num_kv_heads=2",
        "model.rope_theta=500",
    ],
    "llama-w128-tied-bias-completep": [
        *LLAMA,
        *width(128),
        "model.tie_embeddings=true",
        "model.embedding_init_std=0.15",  # it is the readout too: keeps the logits O(1–10)
        "model.bias=true",
        "model.parametrization=completep",
        "model.mup_base_num_layers=1",
        "model.scale_qk_dot_by_d=false",
        "model.norm_eps=1e-6",
    ],
    "gpt2-w64-untied-nobias": [*GPT2, *width(64)],
    "gpt2-w128-tied-bias-completep": [
        *GPT2,
        *width(128),
        "model.tie_embeddings=true",
        "model.embedding_init_std=0.15",  # it is the readout too: keeps the logits O(1–10)
        "model.bias=true",
        "model.parametrization=completep",
        "model.mup_base_num_layers=1",
        "model.scale_output_logits_by_d=false",
    ],
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_the_export_with_our_logits(tmp_path, case):
    cfg, run_dir, model = make_run(tmp_path, *MUP, *CASES[case])  # later overrides win
    res = export_run(run_dir, tmp_path / "hf")
    assert res.layout == case.split("-")[0]
    assert not res.tied  # tied in training, but the embedding and readout scales differ: untied
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    assert ours.std() > 1.0  # logits large enough for 1e-4 to be a strict bound
    theirs = hf_logits(tmp_path / "hf", tokens)
    assert (theirs - ours).abs().max().item() < 1e-4
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["vocab_size"] == cfg.model.vocab_size and hf_cfg["tie_word_embeddings"] is False
    if res.layout == "llama":
        assert hf_cfg["num_key_value_heads"] == cfg.model.kv_heads
        assert hf_cfg["rope_theta"] == cfg.model.rope_theta


def test_tied_readout_stays_tied_when_the_folded_weights_agree(tmp_path):
    # embeddings_scale = α_out/m = 3/2: folded embedding and folded readout are the same matrix.
    over = [*MUP, *LLAMA, *width(64), "model.tie_embeddings=true", "model.embeddings_scale=1.5"]
    cfg, run_dir, model = make_run(tmp_path, *over)
    res = export_run(run_dir, tmp_path / "hf")
    assert res.tied and res.factors["embedding"] == res.factors["readout"] == 1.5
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "hf" / "model.safetensors"))
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ours = model(tokens)
    assert (hf_logits(tmp_path / "hf", tokens) - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
@pytest.mark.parametrize("w", [32, 64, 128, 256])
def test_folded_weights_are_the_same_function_in_sp_form_at_every_width(w, layout):
    arch = LLAMA if layout == "llama" else GPT2
    cfg = tiny_config(*MUP, *arch, *width(w), "model.tie_embeddings=true")
    torch.manual_seed(w)
    model = build_model(cfg.model).eval()
    folded = fold_multipliers(model)
    m = w / 32
    assert folded.factors["readout"] == pytest.approx(3.0 / m)
    assert folded.factors["attention_q"] == pytest.approx(1.7 / cfg.model.head_dim * cfg.model.head_dim**0.5)
    assert check_folding(model, folded) < 1e-5


def test_a_wrong_fold_is_caught_by_the_check():
    cfg = tiny_config(*MUP, *LLAMA, *width(64))
    model = build_model(cfg.model).eval()
    folded = fold_multipliers(model)
    folded.state["blocks.0.attn.q.weight"] = folded.state["blocks.0.attn.q.weight"] * 1.1
    with pytest.raises(RuntimeError, match="differs"):
        check_folding(model, folded)


def test_the_byte_level_tokenizer_export_encodes_bytes_as_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, run_dir, _ = make_run(tmp_path, *LLAMA)
    export_run(run_dir, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    text = "déf f(x):\n    return x·2 € 🙂"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    record = json.loads((tmp_path / "hf" / "mupfast_export.json").read_text())
    assert record["tokenizer"]["kind"] == "byte" and record["step"] == 7


UNSUPPORTED = [
    (["model.position=rope", "model.norm=layernorm"], "model.norm"),
    (["model.position=rope", "model.mlp=gelu"], "model.mlp"),
    (["model.position=learned", "model.norm=rmsnorm", "model.mlp=gelu"], "model.norm"),
    (["model.position=learned", "model.norm=layernorm", "model.mlp=swiglu"], "model.mlp"),
    ([*GPT2, "model.num_kv_heads=1"], "model.num_kv_heads"),
    (["model.moe_experts=4", "model.moe_top_k=2"], "model.moe_experts"),
]


@pytest.mark.parametrize("overrides,key", UNSUPPORTED)
def test_an_architecture_no_layout_expresses_is_a_one_line_error_naming_the_key(
    tmp_path, capsys, overrides, key
):
    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError, match=key):
        layout_for(cfg.model)
    _, run_dir, _ = make_run(tmp_path, *overrides)
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}:") and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_run_and_checkpoint_problems_are_one_line_errors(tmp_path, capsys):
    def export_err(run, *extra) -> str:
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    assert "run directory not found" in export_err(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "config.yaml" in export_err(tmp_path / "empty")
    _, run_dir, _ = make_run(tmp_path, *LLAMA)
    (run_dir / "checkpoints" / "latest").unlink()
    assert "no checkpoint" in export_err(run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step00000007")
    assert "do not fit" in export_err(run_dir, "model.hidden_size=64", "model.filter_size=64")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert "not empty" in export_err(run_dir)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_run_from_the_real_trainer_exports_and_generates(tmp_path, capsys, stage):
    """Through `mupfast.train` itself: its checkpoint files (ZeRO-3: consolidated), then both verbs."""
    from mupfast.train import train

    over = [*MUP, *LLAMA, *width(64), "model.num_kv_heads=2", "model.mup_base_num_kv_heads=1"]
    over.append(f"zero.stage={stage}")
    cfg = tiny_config(*over, "train.steps=2", "train.eval_batches=1", "optim.lr=1e-3", tmp_path=tmp_path)
    train(cfg)
    run_dir = tmp_path / "run"
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert "llama layout" in capsys.readouterr().out
    run = load_run(run_dir)
    assert run.checkpoint.name == "step00000002"
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ours = run.model(tokens)
    assert (hf_logits(tmp_path / "hf", tokens) - ours).abs().max().item() < 1e-4
    argv = ["generate", "--run", str(run_dir), "--prompt", "def ", "--max-new-tokens", "6", "--seed", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")


def test_half_precision_export_writes_that_dtype(tmp_path, capsys):
    from safetensors import safe_open

    _, run_dir, _ = make_run(tmp_path, *GPT2)
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "x"), "--dtype", "fp8"]) == 2
    assert "--dtype" in capsys.readouterr().err


def test_a_bpe_run_carries_its_tokenizer_when_the_data_directory_is_gone(tmp_path):
    import shutil

    import mupfast.train as trainer
    from mupfast.export import load_run, run_tokenizer
    from tests.helpers import tiny_config

    cfg = tiny_config(
        "train.steps=2",
        "schedule.warmup_steps=1",
        "data.tokenizer=bpe",
        "data.bpe_vocab_size=300",
        "model.vocab_size=320",
        "data.max_corpus_bytes=100000",
        tmp_path=tmp_path,
    )
    trainer.train(cfg)
    trained = run_tokenizer(cfg)
    shutil.rmtree(cfg.data.dir)
    run = load_run(cfg.train.run_dir)
    tok = run_tokenizer(run.cfg, run.run_dir)
    assert tok.fingerprint == trained.fingerprint
    assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"
    assert not (tmp_path / "data").exists()  # nothing was re-prepared


def test_a_run_whose_training_data_is_not_here_still_loads_its_config(tmp_path):
    """Export and generate need the model, not the data: the corpus, data.prepared and a mixture's
    prepared sources may all be on the training machine only."""
    import yaml

    from mupfast.config import load_config
    from mupfast.export.load import read_run_config

    raw = load_config(None).to_dict()
    raw["data"].update(corpus="/elsewhere/*.jsonl", prepared="/elsewhere/prepared")
    raw["data"]["sources"] = [{"prepared": "/elsewhere/a", "weight": 1.0}, {"corpus": "/elsewhere/b"}]
    raw["zero"]["ds_config"] = "/elsewhere/ds.json"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = read_run_config(tmp_path)
    assert cfg.data.sources[0].prepared == "/elsewhere/a" and cfg.data.prepared == "/elsewhere/prepared"
