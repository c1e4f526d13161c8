"""The config loader and every cross-field rule of ``mupfast.config.validate``, one message each."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mupfast.config import Config, load_config
from mupfast.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"
#: Files in configs/ that are not run configs (read by their own loaders).
NOT_RUN_CONFIGS = {"sweep-space.yaml", "pbt-space.yaml"}

MOE = ["model.moe_experts=4"]
HYPERP = ["model.parametrization=hyperp"]


def exact(message: str) -> str:
    """A regex matching exactly this message."""
    return f"^{re.escape(message)}$"


def positive(key: str, got: str) -> str:
    """The message of a ``_require_positive`` key."""
    return exact(f"{key}: must be positive (got {got})")


def row(id: str, overrides: list[str], pattern: str):
    """One table row: overrides that break one rule, and the message regex."""
    return pytest.param(overrides, pattern, id=id)


RULES = [
    # model.*: sizes (each key of _require_positive)
    row("model.vocab_size-zero", ["model.vocab_size=0"], positive("model.vocab_size", "0")),
    row("model.hidden_size-zero", ["model.hidden_size=0"], positive("model.hidden_size", "0")),
    row("model.num_layers-zero", ["model.num_layers=0"], positive("model.num_layers", "0")),
    row("model.num_heads-negative", ["model.num_heads=-2"], positive("model.num_heads", "-2")),
    row("model.filter_size-zero", ["model.filter_size=0"], positive("model.filter_size", "0")),
    row("model.max_seq_len-zero", ["model.max_seq_len=0"], positive("model.max_seq_len", "0")),
    row("model.num_kv_heads-zero", ["model.num_kv_heads=0"], positive("model.num_kv_heads", "0")),
    row(
        "model.mup_base_hidden_size-zero",
        ["model.mup_base_hidden_size=0"],
        positive("model.mup_base_hidden_size", "0.0"),
    ),
    row(
        "model.mup_base_filter_size-negative",
        ["model.mup_base_filter_size=-1"],
        positive("model.mup_base_filter_size", "-1.0"),
    ),
    row(
        "model.mup_base_num_layers-zero",
        ["model.mup_base_num_layers=0"],
        positive("model.mup_base_num_layers", "0"),
    ),
    row("model.init_std-zero", ["model.init_std=0"], positive("model.init_std", "0.0")),
    row("model.o_init_std-zero", ["model.o_init_std=0"], positive("model.o_init_std", "0.0")),
    row(
        "model.ffn_out_init_std-negative",
        ["model.ffn_out_init_std=-1"],
        positive("model.ffn_out_init_std", "-1.0"),
    ),
    row(
        "model.init_truncation-negative",
        ["model.init_truncation=-2"],
        exact("model.init_truncation: must be 0 (no truncation) or positive (got -2.0)"),
    ),
    row("model.norm_eps-negative", ["model.norm_eps=-1"], positive("model.norm_eps", "-1.0")),
    row(
        "model.attention_logits_alpha-zero",
        ["model.attention_logits_alpha=0"],
        positive("model.attention_logits_alpha", "0.0"),
    ),
    # model.*: heads, positions, depth
    row(
        "hidden-not-divisible-by-heads",
        ["model.hidden_size=250"],
        exact("model.hidden_size: 250 is not divisible by model.num_heads (4)"),
    ),
    row(
        "heads-not-multiple-of-kv-heads",
        ["model.num_kv_heads=3"],
        exact("model.num_heads: 4 is not a multiple of model.num_kv_heads (3)"),
    ),
    row(
        "rope-odd-head-dim",
        ["model.hidden_size=12", "model.num_heads=4"],
        exact("model.position: rope needs an even head dim (got 3)"),
    ),
    row(
        "depth_alpha-not-half-or-one",
        ["model.depth_alpha=0.7"],
        exact("model.depth_alpha: must be 0.5 or 1 (got 0.7)"),
    ),
    # model.moe_*
    row(
        "moe_experts-negative",
        ["model.moe_experts=-1"],
        exact("model.moe_experts: must be non-negative, 0 for dense (got -1)"),
    ),
    row(
        "moe_top_k-above-experts",
        [*MOE, "model.moe_top_k=5"],
        exact("model.moe_top_k: must be in [1, moe_experts=4] (got 5)"),
    ),
    row(
        "moe_top_k-zero",
        [*MOE, "model.moe_top_k=0"],
        exact("model.moe_top_k: must be in [1, moe_experts=4] (got 0)"),
    ),
    row(
        "moe_granularity-not-dividing",
        [*MOE, "model.moe_granularity=3"],
        exact("model.moe_granularity: must divide model.filter_size (1024) (got 3)"),
    ),
    row(
        "moe_granularity-zero",
        [*MOE, "model.moe_granularity=0"],
        exact("model.moe_granularity: must divide model.filter_size (1024) (got 0)"),
    ),
    row(
        "moe_shared_p-above-one",
        [*MOE, "model.moe_shared_p=1.5"],
        exact("model.moe_shared_p: must be in [0, 1] (got 1.5)"),
    ),
    row(
        "moe_aux_loss_coef-negative",
        [*MOE, "model.moe_aux_loss_coef=-1"],
        exact("model.moe_aux_loss_coef: must be non-negative, 0 disables (got -1.0)"),
    ),
    row(
        "moe_router_z_coef-negative",
        [*MOE, "model.moe_router_z_coef=-0.5"],
        exact("model.moe_router_z_coef: must be non-negative, 0 disables (got -0.5)"),
    ),
    row(
        "moe_every-above-layers",
        [*MOE, "model.moe_every=5"],
        exact("model.moe_every: must be in [1, num_layers=4] (got 5)"),
    ),
    row(
        "moe-grouped-under-zero3",
        [*MOE, "model.moe_dispatch=grouped", "zero.stage=3"],
        exact("model.moe_dispatch: grouped does not run under zero.stage 3 (use loop)"),
    ),
    row(
        "moe-grouped-unaligned-expert",
        [*MOE, "model.moe_dispatch=grouped", "model.moe_granularity=256"],
        exact(
            "model.moe_dispatch: grouped needs hidden_size and the expert hidden size "
            "(filter_size / moe_granularity) to be multiples of 8 (got 256, 4)"
        ),
    ),
    # model.vocab_size against data.tokenizer
    row(
        "byte-vocab-below-256",
        ["model.vocab_size=100"],
        exact("model.vocab_size: the byte tokenizer needs at least 256 (got 100)"),
    ),
    row(
        "bpe-vocab-below-bpe_vocab_size",
        ["data.tokenizer=bpe", "model.vocab_size=1000"],
        exact("model.vocab_size: 1000 is smaller than data.bpe_vocab_size (4096)"),
    ),
    # model.* under hyperp
    row(
        "hyperp-readout_zero_init-on-sphere",
        [*HYPERP, "model.readout_zero_init=true"],
        exact(
            "model.readout_zero_init: not with hyperp's readout sphere (set model.hyperp_readout_sphere=false)"
        ),
    ),
    row(
        "hyperp-base_depth-zero",
        [*HYPERP, "model.hyperp_base_depth=0"],
        positive("model.hyperp_base_depth", "0"),
    ),
    # train.*
    row("train.steps-zero", ["train.steps=0"], positive("train.steps", "0")),
    row("train.seq_len-zero", ["train.seq_len=0"], positive("train.seq_len", "0")),
    row("train.micro_batch_size-zero", ["train.micro_batch_size=0"], positive("train.micro_batch_size", "0")),
    row(
        "train.grad_accum_steps-negative",
        ["train.grad_accum_steps=-1"],
        positive("train.grad_accum_steps", "-1"),
    ),
    row("train.dist_timeout_s-zero", ["train.dist_timeout_s=0"], positive("train.dist_timeout_s", "0")),
    row(
        "seq_len-above-max_seq_len",
        ["train.seq_len=512"],
        exact("train.seq_len: 512 exceeds model.max_seq_len (256)"),
    ),
    # optim.*
    row("optim.lr-zero", ["optim.lr=0"], positive("optim.lr", "0.0")),
    row("optim.lr-nan", ["optim.lr=.nan"], positive("optim.lr", "nan")),
    row("optim.eps-zero", ["optim.eps=0"], positive("optim.eps", "0.0")),
    row("optim.beta1-one", ["optim.beta1=1"], exact("optim.beta1: must be in [0, 1) (got 1.0)")),
    row("optim.beta2-negative", ["optim.beta2=-0.1"], exact("optim.beta2: must be in [0, 1) (got -0.1)")),
    row(
        "optim.weight_decay-negative",
        ["optim.weight_decay=-0.1"],
        exact("optim.weight_decay: must be non-negative (got -0.1)"),
    ),
    # optim.* under hyperp
    row("hyperp-base_lr-zero", [*HYPERP, "optim.hyperp_base_lr=0"], positive("optim.hyperp_base_lr", "0.0")),
    row(
        "hyperp-base_batch_tokens-zero",
        [*HYPERP, "optim.hyperp_base_batch_tokens=0"],
        positive("optim.hyperp_base_batch_tokens", "0"),
    ),
    row(
        "hyperp-base_tokens-negative",
        [*HYPERP, "optim.hyperp_base_tokens=-1"],
        positive("optim.hyperp_base_tokens", "-1.0"),
    ),
    row(
        "hyperp-muon_momentum-one",
        [*HYPERP, "optim.muon_momentum=1"],
        exact("optim.muon_momentum: must be in [0, 1) (got 1.0)"),
    ),
    # data.*
    row(
        "data.val_fraction-zero",
        ["data.val_fraction=0"],
        exact("data.val_fraction: must be between 0 and 1 (got 0.0)"),
    ),
    row(
        "data.val_fraction-one",
        ["data.val_fraction=1"],
        exact("data.val_fraction: must be between 0 and 1 (got 1.0)"),
    ),
    row(
        "data.prepared-missing-dir",
        ["data.prepared=/nonexistent/dir"],
        exact("data.prepared: directory does not exist: /nonexistent/dir"),
    ),
    # (a corpus path that is not on this machine is an error when the data is prepared: test_data)
    row(
        "data.corpus-empty",
        ["data.corpus=[]"],
        exact("data.corpus: empty (give a path, a glob, a list of them, or stdlib)"),
    ),
    row(
        "data.text_field-empty",
        ["data.text_field=''"],
        exact("data.text_field: empty (the JSON Lines / Parquet field of the text)"),
    ),
    row(
        "data.tokenizer-empty",
        ["data.tokenizer=''"],
        exact("data.tokenizer: empty (byte, bpe, or the path of a tokenizer.json)"),
    ),
    row(
        "data.eos_token-empty",
        ["data.eos_token=''"],
        exact("data.eos_token: empty (leave it out to use the tokenizer's own)"),
    ),
    row("data.shard_tokens-zero", ["data.shard_tokens=0"], positive("data.shard_tokens", "0")),
    row(
        "data.workers-negative",
        ["data.workers=-1"],
        exact("data.workers: workers and max_corpus_bytes must be non-negative (0: all cores, no cap)"),
    ),
    row(
        "data.sources-with-prepared",
        ["data.sources=[{corpus: a.jsonl}]", "data.prepared=/tmp"],
        exact("data.sources: a mixture names each source's data; leave data.prepared empty"),
    ),
    row(
        "data.sources-with-bpe",
        ["data.sources=[{corpus: a.jsonl}]", "data.tokenizer=bpe", "model.vocab_size=5000"],
        r"^data\.sources: a mixture needs one tokenizer for every source; train the BPE",
    ),
    row(
        "data.sources-weight",
        ["data.sources=[{corpus: a.jsonl, weight: 0}]"],
        exact("data.sources[0].weight: must be a positive number (got 0.0)"),
    ),
    row(
        "data.sources-nothing",
        ["data.sources=[{corpus: a.jsonl}, {weight: 2}]"],
        exact("data.sources[1]: give its corpus or its prepared directory"),
    ),
    row(
        "data.sources-prepared-missing",
        ["data.sources=[{prepared: /nonexistent/dir}]"],
        exact("data.sources[0].prepared: directory does not exist: /nonexistent/dir"),
    ),
    # zero.*
    row("zero.stage-four", ["zero.stage=4"], exact("zero.stage: must be 0, 1, 2 or 3 (got 4)")),
    row("zero.stage-negative", ["zero.stage=-1"], exact("zero.stage: must be 0, 1, 2 or 3 (got -1)")),
    row(
        "zero.ds_config-missing-file",
        ["zero.ds_config=/nonexistent/ds.json"],
        exact("zero.ds_config: file not found: /nonexistent/ds.json"),
    ),
    # clip.*
    row(
        "clip.max_norm-negative",
        ["clip.max_norm=-1"],
        exact("clip.max_norm: thresholds must be non-negative (0 disables)"),
    ),
    row(
        "clip.global_max_norm-negative",
        ["clip.global_max_norm=-1"],
        exact("clip.max_norm: thresholds must be non-negative (0 disables)"),
    ),
    # schedule.*
    row(
        "schedule.min_lr_ratio-above-one",
        ["schedule.min_lr_ratio=1.5"],
        exact("schedule.min_lr_ratio: must be in [0, 1] (got 1.5)"),
    ),
    row(
        "schedule.decay_fraction-negative",
        ["schedule.decay_fraction=-0.1"],
        exact("schedule.decay_fraction: must be in [0, 1] (got -0.1)"),
    ),
    row(
        "schedule.warmup_steps-negative",
        ["schedule.warmup_steps=-1"],
        exact("schedule.warmup_steps: warmup_steps and cycle_steps must be non-negative"),
    ),
    row(
        "schedule.cycle_steps-negative",
        ["schedule.kind=cyclic_cosine", "schedule.cycle_steps=-1"],
        exact("schedule.warmup_steps: warmup_steps and cycle_steps must be non-negative"),
    ),
    # schedule: what only build_schedule (against train.steps) finds
    row(
        "schedule-cosine-warmup-not-below-steps",
        ["schedule.warmup_steps=200"],
        exact("schedule: cosine: warmup_steps (200) must be smaller than total_steps (200)"),
    ),
    row(
        "model.mup_base_filter_size-missing",
        ["model.hidden_size=256", "model.filter_size=1024", "model.mup_base_hidden_size=64"],
        r"^model\.mup_base_filter_size: must be set with model\.mup_base_hidden_size .*e\.g\. 256 ",
    ),
    row(
        "model.mup_base_hidden_size-missing",
        ["model.hidden_size=256", "model.filter_size=1024", "model.mup_base_filter_size=256"],
        r"^model\.mup_base_hidden_size: must be set with model\.mup_base_filter_size ",
    ),
    row(
        "model.mup_base_num_kv_heads-missing",
        [
            "model.hidden_size=256",
            "model.num_heads=8",
            "model.num_kv_heads=2",
            "model.mup_base_hidden_size=64",
            "model.mup_base_filter_size=256",
        ],
        r"^model\.mup_base_num_kv_heads: must be set .*: 2 if the kv heads stay fixed",
    ),
    row(
        "model.mup_base_num_kv_heads-above-kv-heads",
        [
            "model.num_kv_heads=2",
            "model.mup_base_hidden_size=64",
            "model.mup_base_filter_size=256",
            "model.mup_base_num_kv_heads=4",
        ],
        r"^model\.mup_base_num_kv_heads: 4 is more than this model's 2 kv heads",
    ),
    row(
        "schedule-constant-warmup-not-below-steps",
        ["schedule.kind=constant", "train.steps=10", "schedule.warmup_steps=10"],
        exact("schedule: constant: warmup_steps (10) must be smaller than total_steps (10)"),
    ),
    row(
        "schedule-wsd-warmup-overlaps-decay",
        ["schedule.kind=wsd", "schedule.warmup_steps=170"],
        exact(
            "schedule: wsd: warmup_steps (170) overlaps the decay: total_steps (200) × "
            "decay_fraction (0.2) = 40 decay steps leave only 160 before it"
        ),
    ),
    row(
        "schedule-cyclic_cosine-warmup-not-below-cycle",
        ["schedule.kind=cyclic_cosine", "schedule.cycle_steps=50", "schedule.warmup_steps=50"],
        exact("schedule: cyclic_cosine: warmup_steps (50) must be smaller than cycle_steps (50)"),
    ),
    row(
        "schedule-cyclic_cosine-peak_decay-zero",
        ["schedule.kind=cyclic_cosine", "schedule.cycle_peak_decay=0"],
        exact("schedule: cyclic_cosine: cycle_peak_decay must be in (0, 1] (got 0.0)"),
    ),
    row(
        "schedule-cyclic_wsd-peak_decay-above-one",
        ["schedule.kind=cyclic_wsd", "schedule.cycle_peak_decay=1.5"],
        exact("schedule: cyclic_wsd: cycle_peak_decay must be in (0, 1] (got 1.5)"),
    ),
    row(
        "schedule-cyclic_wsd-warmup-overlaps-decay",
        ["schedule.kind=cyclic_wsd", "schedule.cycle_steps=50", "schedule.warmup_steps=45"],
        exact(
            "schedule: cyclic_wsd: warmup_steps (45) overlaps the decay: cycle_steps (50) × "
            "decay_fraction (0.2) = 10 decay steps leave only 40 before it"
        ),
    ),
]


@pytest.mark.parametrize("overrides, pattern", RULES)
def test_each_rule_names_its_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_newton_schulz_triton_needs_triton(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    message = "optim.newton_schulz_backend: triton is not installed (use auto or torch)"
    with pytest.raises(ConfigError, match=exact(message)):
        load_config(None, [*HYPERP, "optim.newton_schulz_backend=triton"])
    load_config(None, ["optim.newton_schulz_backend=triton"])  # only hyperp uses Muon


@pytest.mark.parametrize(
    "content, pattern",
    [
        pytest.param("{not json", r"is not valid JSON \(", id="invalid-json"),
        pytest.param("[1, 2]", r"must hold a JSON object$", id="not-an-object"),
        pytest.param(
            json.dumps({"optimizer": {}}), r"sets 'optimizer', which mupfast owns: ", id="owned-key"
        ),
        pytest.param(
            json.dumps({"fp16": {"enabled": True}}),
            r"sets 'fp16', which mupfast owns: set train.precision \(fp16 is not supported; use bf16\)$",
            id="owned-fp16",
        ),
    ],
)
def test_ds_config_file_rules(tmp_path, content, pattern):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"^zero.ds_config: {re.escape(str(path))} {pattern}"):
        load_config(None, [f"zero.ds_config={path}"])


def test_ds_config_that_is_a_directory_is_not_json(tmp_path):
    with pytest.raises(ConfigError, match=f"^zero.ds_config: {re.escape(str(tmp_path))} is not valid JSON"):
        load_config(None, [f"zero.ds_config={tmp_path}"])


def test_ds_config_with_only_free_keys_loads(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"_comment": "x", "zero_optimization": {"overlap_comm": True}}))
    assert load_config(None, [f"zero.ds_config={path}"]).zero.ds_config == str(path)


def test_moe_keys_are_only_checked_for_an_moe_model():
    assert load_config(None, ["model.moe_top_k=9", "model.moe_every=0"]).model.moe_experts == 0


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        pytest.param(
            ["optim.lrr=1"], exact("optim.lrr: unknown key (did you mean optim.lr?)"), id="did-you-mean"
        ),
        pytest.param(
            ["train.steps=abc"], exact("train.steps: expected an integer (got 'abc')"), id="not-an-int"
        ),
        pytest.param(
            ["train.steps=1.5"], exact("train.steps: expected an integer (got 1.5)"), id="fractional-int"
        ),
        pytest.param(
            ["steps=5"],
            exact("override 'steps=5': expected section.key=value, e.g. optim.lr=3e-3"),
            id="no-section",
        ),
        pytest.param(
            ["train.steps"],
            exact("override 'train.steps': expected section.key=value, e.g. optim.lr=3e-3"),
            id="no-value",
        ),
    ],
)
def test_loader_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_yaml_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- optim\n")
    with pytest.raises(ConfigError, match=exact(f"{path}: the top level must be a mapping of sections")):
        load_config(path)


def test_defaults_and_repo_configs_are_valid():
    assert isinstance(load_config(None), Config)
    paths = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_RUN_CONFIGS)
    assert len(paths) >= 5 and NOT_RUN_CONFIGS <= {p.name for p in CONFIGS.glob("*.yaml")}
    for path in paths:
        assert isinstance(load_config(path), Config), path


def test_a_features_section_is_read_checked_and_written_like_a_core_one():
    """fine-tuning registers the ``finetune`` section (mupfast.plugins): dotted keys, did-you-mean,
    its checks in validate, to_dict, with_overrides and dataclasses.replace all reach it."""
    import dataclasses

    from mupfast.config import config_from_dict, with_overrides

    cfg = load_config(None, ["finetune.method=lora", "finetune.rank=4"])
    assert cfg.finetune.method == "lora" and cfg.finetune.rank == 4
    assert list(load_config(None).to_dict())[-1] == "finetune"  # every config.yaml has the section
    assert config_from_dict(cfg.to_dict()) == cfg
    assert with_overrides(cfg, {"finetune.rank": 2}).finetune.rank == 2 and cfg.finetune.rank == 4
    changed = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, alpha=3.0))
    assert changed.finetune.alpha == 3.0 and changed.model == cfg.model and cfg.finetune.alpha == 16.0
    with pytest.raises(ConfigError, match=exact("finetune.rnak: unknown key (did you mean finetune.rank?)")):
        load_config(None, ["finetune.rnak=4"])
    with pytest.raises(ConfigError, match=exact("finetun: unknown key (did you mean finetune?)")):
        load_config(None, ["finetun.rank=4"])
    with pytest.raises(ConfigError, match=exact("finetune.rank: must be positive (got 0)")):
        load_config(None, ["finetune.method=lora", "finetune.rank=0"])
