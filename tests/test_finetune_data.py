"""Prompt/completion JSON Lines: prompt tokens carry no loss, completions and their EOS do, through
the trainer's own sampler, and `mupfast finetune` trains on such a file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mupfast.cli import main
from mupfast.data import BatchSampler, prepare_sources
from mupfast.finetune.data import completion_only, is_prompt_completion, prepare_finetune_data
from mupfast.finetune.finetune import finetune_config
from mupfast.model import build_model
from tests.test_finetune import make_base_run


def write_jsonl(path, n: int = 200, seed: int = 0):
    """Prompts of upper-case letters, completions of lower-case ones: a byte says which it is."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rng.choice("ABCDEFGH") for _ in range(rng.randint(1, 20)))
            completion = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"prompt": prompt, "completion": completion, "id": 1}) + "\n")
    return path


def ft(tmp_path, *overrides):
    base_run, _ = make_base_run(tmp_path)
    corpus = write_jsonl(tmp_path / "pc.jsonl")
    return finetune_config(
        base_run,
        None,
        [
            f"data.corpus={corpus}",
            f"data.dir={tmp_path}/data",
            "train.seq_len=32",
            "train.micro_batch_size=8",
            "train.progress=false",
            f"train.run_dir={tmp_path}/ft",
            *overrides,
        ],
    )


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_prompt_tokens_carry_no_loss_and_completions_do(tmp_path, sampling):
    cfg = ft(tmp_path, f"data.sampling={sampling}")
    assert is_prompt_completion(cfg)
    cfg = prepare_finetune_data(cfg)
    (src,) = prepare_sources(cfg.data, progress=False)
    sampler = completion_only(
        BatchSampler([src.train_set()], seq_len=32, micro_batch_size=8, seed=0, sampling=sampling)
    )
    upper, lower = set(b"ABCDEFGH"), set(b"abcdefgh") | {0}  # 0: the byte tokenizer's EOS
    seen_masked = seen_kept = 0
    for step in range(20):
        x, y = sampler.batch(step)
        assert int(x.max()) < 256 and set(x.flatten().tolist()) <= upper | lower
        kept = y != -100
        assert set(y[kept].tolist()) <= lower  # every target with a loss is a completion token or EOS
        inner = y[:, :-1] == -100  # a masked target's token is x's next one: a prompt token
        assert set(x[:, 1:][inner].tolist()) <= upper
        assert set(x[:, 1:][~inner].tolist()) <= lower
        seen_masked, seen_kept = seen_masked + int((~kept).sum()), seen_kept + int(kept.sum())
    assert seen_masked > 0 and seen_kept > 0
    # The loss is the mean over the completion targets alone (float64 reference).
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, y = sampler.batch(0)
    with torch.no_grad():
        loss = model(x, y)
        logits = model(x).double()
    ref = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-5
    val = list(
        completion_only(BatchSampler([src.val_set()], seq_len=32, micro_batch_size=2, seed=0)).eval_batches(1)
    )
    assert (val[0][1] == -100).any()


def test_a_prepared_prompt_completion_set_is_found_again(tmp_path):
    import dataclasses

    raw = ft(tmp_path)
    cfg = prepare_finetune_data(raw)
    made = (Path(cfg.data.prepared) / "index.json").stat().st_mtime_ns
    again = prepare_finetune_data(raw)
    assert cfg.data.prepared == again.data.prepared and "prompt-completion-" in cfg.data.prepared
    assert (Path(again.data.prepared) / "index.json").stat().st_mtime_ns == made
    text = dataclasses.replace(raw, finetune=dataclasses.replace(raw.finetune, format="text"))
    assert not is_prompt_completion(text)


def test_finetune_trains_on_prompt_completion_jsonl(tmp_path):
    base_run, _ = make_base_run(tmp_path)
    corpus = write_jsonl(tmp_path / "pc.jsonl")
    ftc = tmp_path / "ft.yaml"
    ftc.write_text(yaml.safe_dump({"finetune": {"method": "lora"}, "data": {"corpus": str(corpus)}}))
    args = [
        "train.steps=4",
        "train.progress=false",
        "train.micro_batch_size=4",
        "train.eval_batches=1",
        "train.log_every=1",
        f"data.dir={tmp_path}/data",
        f"train.run_dir={tmp_path}/ft",
    ]
    assert main(["finetune", "--run", str(base_run), "--config", str(ftc), *args]) == 0
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert "prompt-completion-" in saved["data"]["prepared"]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] is not None
