"""The run configuration's schema: one dataclass per section, a docstring on every field.

This module imports nothing of mupfast: loading, overrides and checks are :mod:`mupfast.config.load`
and :mod:`mupfast.config.validate`; a feature's section is its own dataclass, registered through
:mod:`mupfast.plugins`. The μP keys of the model section keep the Cerebras Model Zoo names so their
configs port.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Parametrization = Literal["sp", "mup", "completep", "hyperp"]
#: Every parametrization, in the order the checks compare them.
PARAMETRIZATIONS: tuple[str, ...] = typing.get_args(Parametrization)


@dataclass
class ModelConfig:
    """Architecture and parametrization of the decoder-only transformer."""

    vocab_size: int = 256
    """Size of the token vocabulary (256 for the byte-level tokenizer)."""
    hidden_size: int = 256
    """Model width d."""
    num_layers: int = 4
    """Number of transformer blocks L."""
    num_heads: int = 4
    """Query heads; hidden_size must be divisible by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads (plain multi-head)."""
    filter_size: int = 1024
    """Inner width of the MLP."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (sizes the learned position table; bounds RoPE)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    position: Literal["rope", "learned"] = "rope"
    """Rotary embeddings on q/k, or a learned absolute position table added to the embedding."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """SwiGLU (gate, up, down) or GELU (up, down) MLP."""
    tie_embeddings: bool = False
    """Share the token embedding with the unembedding (readout)."""
    bias: bool = False
    """Biases on the linear layers."""

    parametrization: Parametrization = "mup"
    """sp: standard (no width scaling); mup: μP; completep: μP plus depth transfer (CompleteP);
    hyperp: hidden matrices trained by Muon on their init Frobenius sphere, one lr from the
    HyperP transfer rule (optim.hyperp_*)."""
    mup_base_hidden_size: float | None = None
    """Proxy width the μP multipliers are relative to (m = hidden_size / this). None: hidden_size.
    A real number is allowed: the rules only divide by it (BTLM's proxy filter size is 682.6)."""
    mup_base_filter_size: float | None = None
    """Proxy MLP width (m_f = filter_size / this). None: filter_size; required with mup_base_hidden_size."""
    mup_base_num_kv_heads: int | None = None
    """Proxy key/value heads (same head dim). Equal to num_kv_heads when the kv heads stay fixed as the
    width grows (Llama-style): k and v are then output-like (init σ/m, lr × 1/m). None: they grow with m."""
    mup_base_num_layers: int | None = None
    """Proxy depth for completep (m_L = num_layers / this). None: num_layers."""
    hyperp_readout_sphere: bool = True
    """HyperP: train an untied readout by AdamW on the sphere of its init norm (AdamH, as the anchor
    does) rather than by plain AdamW. Its radius grows with width; the logits' 1/m keeps them in scale."""
    hyperp_base_depth: int = 8
    """HyperP: base depth d0 of the transfer rule η = η0·√(B/B0)·√(d0/L)·(T/T0)^-0.32 (ArchScale: 8)."""
    depth_alpha: float = 1.0
    """CompleteP exponent α ∈ {0.5, 1}: residual branches × m_L^-α, hidden lr × m_L^(α-1)."""
    init_std: float = 0.02
    """σ: base init std of the hidden matrices (scaled by 1/√m under μP)."""
    embedding_init_std: float | None = None
    """σ_emb: init std of the token (and position) embedding; None means init_std."""
    output_init_std: float | None = None
    """σ_out: init std of an untied readout; None means init_std."""
    ffn_in_init_std: float | None = None
    """σ of ffn_in (before its width scaling, as init_std); None means init_std (Cerebras: ffn_initializer)."""
    o_init_std: float | None = None
    """σ of the attention output o (before its width and 1/√(2L) scaling); None means init_std
    (Cerebras: output_layer_initializer)."""
    ffn_out_init_std: float | None = None
    """σ of ffn_out (before its width and 1/√(2L) scaling); None means init_std
    (Cerebras: ffn_output_layer_initializer)."""
    init_truncation: float = 0.0
    """Normal inits are truncated at ± this many of their stds (resampled, as torch's trunc_normal_);
    0: plain normals. Model Zoo truncates at ±2 std, which leaves a real std of 0.88 × the std."""
    readout_zero_init: bool = False
    """Initialise an untied readout to zero (μP option; removes the logit noise at step 0)."""
    embeddings_scale: float = 1.0
    """Forward multiplier on the embedding output (Cerebras key)."""
    output_logits_alpha: float = 1.0
    """α_out: logits × α_out / m under μP and hyperp (Cerebras key; m = 1 without mup_base_hidden_size)."""
    attention_logits_alpha: float = 1.0
    """α_attn: attention logits × α_attn / d_head under μP (Cerebras key)."""
    scale_qk_dot_by_d: bool = True
    """μP 1/d_head attention scaling; false gives α_attn/√d_head (Cerebras key)."""
    scale_output_logits_by_d: bool = True
    """Logits × α_out/m; false gives α_out/√m (Cerebras key)."""
    weight_decay_scaling: Literal["independent", "coupled", "none"] = "independent"
    """independent: hidden wd × m so lr·wd is width-invariant; coupled: wd as given; none: no wd."""

    moe_experts: int = 0
    """Mixture of experts (SqrtGate, mupfast/model/moe.py): routed experts E per MoE layer; 0 means dense MLPs."""
    moe_top_k: int = 2
    """Experts each token is routed to (k ≤ moe_experts)."""
    moe_granularity: int = 1
    """Expert hidden size = filter_size / this. Fine-grained MoE scales moe_experts and moe_top_k by the
    same factor so the active FFN width k·filter_size/granularity stays fixed."""
    moe_shared_expert: bool = False
    """Add a shared expert (one routed expert's size) every token passes through."""
    moe_shared_p: float = 0.5
    """Shared-expert mix: output = √(1−p)·routed + √p·shared."""
    moe_aux_loss_coef: float = 0.01
    """Coefficient of the global load-balancing loss E·Σ f_i·P_i (mean over MoE layers) added in training."""
    moe_balance_scope: Literal["data_parallel", "micro_batch"] = "data_parallel"
    """Tokens the expert loads f_i are counted over: every data-parallel rank's micro-batch (one small
    all-reduce per MoE layer; balance is judged on the global batch, not on each rank's sample), or
    this rank's micro-batch alone."""
    moe_router_z_coef: float = 0.0
    """Coefficient of the router Z-loss mean(logsumexp(router logits)²); 0 logs it without training on it."""
    moe_every: int = 1
    """Block i (from 0) is an MoE block when (i + 1) % moe_every == 0: 1 = every block, 2 = every second."""
    moe_dispatch: Literal["loop", "grouped"] = "loop"
    """loop: one matmul chain per expert, sized by per-expert token counts read on the host (one sync
    per MoE layer); grouped: torch's grouped_mm over the experts' stacked weights, no host sync (needs
    hidden_size and the expert hidden size multiples of 8; bf16 on a GPU; ZeRO 0–2). Not yet measured on a GPU."""

    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """auto: on CUDA the fastest measured per shape of our Triton kernel, SDPA (cuDNN, flash) and
    flash-attn, our kernel where document ids or determinism need it (cached on disk); torch SDPA elsewhere."""
    readout_backend: Literal["auto", "torch", "triton"] = "auto"
    """Fused logit multiplier + cross-entropy: auto means Triton on CUDA, chunked torch elsewhere."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class OptimConfig:
    """AdamW hyperparameters; per-group multipliers come from the rules table."""

    lr: float = 3e-3
    """Base learning rate η (each group uses η · schedule(t) · lr_mult)."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.95
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    weight_decay: float = 0.0
    """Base weight decay (each group uses it × wd_mult; norms and biases get 0)."""
    base_batch_tokens: int = 0
    """B0: tokens per optimizer step (every rank's) at which optim.lr and optim.weight_decay were tuned.
    With optim.base_tokens they carry to this run's batch and horizon: lr × (B/B0)^β × (T/T0)^-α, and
    the weight decay so that AdamW's decay timescale stays the same fraction of the run
    (docs/mutransfer.md, "Across tokens and batch"). 0: this run's own (no change). `mupfast transfer`
    sets both to the proxy's. Not under hyperp (its rule has optim.hyperp_base_*)."""
    base_tokens: float = 0.0
    """T0: training tokens at which optim.lr and optim.weight_decay were tuned; 0: this run's own."""
    batch_lr_exponent: float = 0.5
    """β of lr ∝ (B/B0)^β: 0.5, square-root scaling for Adam below the critical batch
    (`mupfast batch-test` measures it on a proxy)."""
    horizon_lr_exponent: float = 0.32
    """α of lr ∝ (T/T0)^-α: 0.32, the token-horizon exponent HyperP uses
    (`mupfast horizon-test` measures it on a proxy)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Clip+AdamW implementation: auto means the fused Triton kernel on CUDA, torch elsewhere."""
    hyperp_base_lr: float = 1.5e-2
    """HyperP: η0, the lr at the base batch B0, depth d0 (model.hyperp_base_depth) and horizon T0.
    Under hyperp every group's lr is η·schedule(t) with η from the transfer rule; optim.lr is unused."""
    hyperp_base_batch_tokens: int = 2**21
    """HyperP: B0, tokens per optimizer step at which η0 was tuned (η ∝ √(B/B0))."""
    hyperp_base_tokens: float = 10.4e9
    """HyperP: T0, training tokens at which η0 was tuned (η ∝ (T/T0)^-0.32)."""
    muon_momentum: float = 0.95
    """HyperP: Nesterov momentum β of Muon on the hidden matrices."""
    newton_schulz_backend: Literal["auto", "torch", "triton"] = "auto"
    """HyperP: Muon's Newton–Schulz implementation. torch: plain matmuls (bf16 on CUDA); triton:
    mupfast.kernels.newton_schulz, symmetric matmuls computing half of X·Xᵀ and A·A (CUDA, or CPU
    under TRITON_INTERPRET=1); auto: torch everywhere, until a GPU measurement
    (benchmarks/bench_newton_schulz.py) shows the Triton kernel faster."""


@dataclass
class ClipConfig:
    """Per-component gradient-norm clipping (Yang & Ma, 2022); done by us, not DeepSpeed."""

    granularity: Literal["component", "layer_component"] = "component"
    """One parameter group (and clip norm) per component, or per layer × component."""
    max_norm: float = 1.0
    """Default threshold on each group's gradient norm; 0 disables per-group clipping."""
    component_max_norm: dict[str, float] = field(default_factory=dict)
    """Per-component overrides, e.g. {embedding: 0.5, readout: 2.0}."""
    global_max_norm: float = 0.0
    """Optional clip of the total (already per-group clipped) norm; 0 disables it."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: a pure function of the step that multiplies every group's lr."""

    kind: Literal["constant", "cosine", "wsd", "cyclic_cosine", "cyclic_wsd"] = "cosine"
    """Shape of the schedule."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    warmup_from_zero: bool = False
    """Warmup step t (from 0) trains at peak·t/W, the first at lr 0 (torch's LinearLR, Cerebras Model
    Zoo); false: peak·(t+1)/(W+1) (nanoGPT)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of the peak."""
    decay_fraction: float = 0.2
    """WSD: share of the (cycle's) steps spent decaying at the end."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """WSD: shape of the final decay."""
    cycle_steps: int = 0
    """Cyclic schedules: steps per cycle (0 means train.steps)."""
    cycle_peak_decay: float = 1.0
    """Cyclic schedules: each cycle's peak is this fraction of the previous one."""
    piecewise: list[list[float]] = field(default_factory=list)
    """[[fraction, multiplier], ...]: from step round(fraction · train.steps) on, the schedule is
    multiplied by multiplier (fractions increase from 0.0). Replays a schedule found by PBT."""


@dataclass
class SourceConfig:
    """One corpus of a mixture (``data.sources``): prepared on its own, drawn from in proportion."""

    corpus: str | list[str] = ""
    """As data.corpus: a path, a glob or a list of them."""
    weight: float = 1.0
    """Share of the training rows (normalised over the sources)."""
    text_field: str | None = None
    """The document field of its JSON Lines / Parquet files; None means data.text_field."""
    prepared: str = ""
    """A directory made by `mupfast prepare-data` to use as this source instead of preparing corpus."""


@dataclass
class DataConfig:
    """Corpus, tokenizer, token shards and how batches are drawn from them."""

    corpus: str | list[str] = "stdlib"
    """'stdlib' (the running Python's standard-library sources, embedded and deterministic), or a path,
    a glob or a list of them: text files (.txt/.md/.py/.rst, one document each), JSON Lines (.jsonl,
    .json, also .gz/.zst) and Parquet (.parquet); directories are searched recursively."""
    text_field: str = "text"
    """The field holding a document's text in JSON Lines records and Parquet rows."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that is not valid JSON or UTF-8, lacks the field or holds a non-string: stop with an
    error naming the file and line, or skip it (counted in meta.json and on stderr)."""
    tokenizer: str = "byte"
    """byte (UTF-8 bytes, vocab 256), bpe (trained locally on the corpus with HF tokenizers), or the
    path of an existing Hugging Face tokenizer.json or of a directory holding one."""
    eos_token: str | None = None
    """The token that ends every document; None: the tokenizer's own (or <|endoftext|>). The byte
    tokenizer's EOS is byte 0, the trained BPE's <|endoftext|>."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of the trained BPE."""
    dir: str = "data"
    """Directory where prepared shards live (one subdirectory per corpus/tokenizer fingerprint)."""
    prepared: str = ""
    """A directory made by `mupfast prepare-data` to train on as it is (no preparation; corpus ignored); every file is checked."""
    val_fraction: float = 0.02
    """Share of the documents held out for validation (chosen by a hash of each document's position)."""
    max_corpus_bytes: int = 0
    """Optional cap on the corpus text read, in document order (keeps a CPU run quick); 0: no cap."""
    shard_tokens: int = 100_000_000
    """Tokens per shard (shards end at a document boundary, so they run slightly over)."""
    workers: int = 0
    """Processes that tokenize in parallel (0: one per CPU core); the result does not depend on it."""
    sampling: Literal["random", "epoch"] = "random"
    """random: windows at uniform random offsets (with replacement); epoch: every sequence window of
    the shards once per epoch, in a shuffled order. Either way a batch is a pure function of the step."""
    document_masking: bool = False
    """Attention stops at document boundaries (the EOS that ends each document): a token sees only
    its own document's tokens, as if every document had a row of its own (targets across a
    boundary are kept: EOS predicts the next document's first token)."""
    reset_position_ids: bool = False
    """Positions (RoPE, or the learned table) restart at 0 at each document's start."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: corpora prepared on their own with this tokenizer and drawn from in proportion to
    their weights (each source's own corpus/prepared replace data.corpus/prepared)."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps."""
    seq_len: int = 128
    """Tokens per sequence (≤ model.max_seq_len)."""
    micro_batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    seed: int = 1234
    """Seed of the init and of the data sampler (keyed by seed, step, rank)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    eval_every: int = 50
    """Evaluate on the val split every N steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Micro-batches per evaluation."""
    log_every: int = 10
    """Write metrics every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (and at the end); 0 only at the end."""
    save_final: bool = True
    """Checkpoint at the end; off for runs whose metrics are all that is wanted (sweeps, grids)."""
    stop_at: int = 0
    """Stop after this step (evaluating and, with save_final, saving there) while the lr schedule keeps
    train.steps as its length; 0 means train.steps. A PBT member trains one interval at a time so."""
    run_dir: str = "runs/latest"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when there is one."""
    max_nonfinite_in_row: int = 5
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""
    dist_timeout_s: int = 600
    """Collective timeout: ranks exit instead of hanging when a peer dies."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    activation_checkpointing: Literal["none", "full", "every_k", "selective"] = "none"
    """Recompute activations in the backward instead of keeping them: none; full (every block);
    every_k (every train.checkpoint_every-th block); selective (every block, keeping matmul outputs)."""
    checkpoint_every: int = 2
    """every_k: checkpoint blocks 0, k, 2k, … (k = this)."""
    compile: bool = False
    """torch.compile each block (regional compilation): norms, RoPE, SwiGLU and residual adds fuse."""

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens one optimizer step consumes over ``world_size`` data-parallel ranks."""
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps * world_size


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings."""

    stage: int = 0
    """ZeRO stage 0–3."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward."""
    reduce_bucket_size: int = 500_000_000
    """Elements per reduction bucket."""
    ds_config: str = ""
    """A DeepSpeed JSON merged over the config mupfast builds (e.g. launch/ds_zero2.json): ZeRO tuning, monitors, comms logging."""


@dataclass(init=False)
class Config:
    """A whole run: the core sections below, and the sections features register (``finetune``).

    A feature's section is read like a core one (``cfg.finetune.method``) and passed by name to the
    constructor and ``dataclasses.replace``; ``to_dict()`` lists it beside the core sections. The
    loader (:func:`mupfast.config.load.config_from_dict`) gives every registered feature its section.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    sections: dict[str, Any] = field(default_factory=dict)
    """The features' sections by key (each a dataclass of the feature's own)."""

    def __init__(self, sections: dict[str, Any] | None = None, **values: Any):
        for f in dataclasses.fields(self):
            if f.name != "sections":
                setattr(self, f.name, values.pop(f.name) if f.name in values else f.default_factory())
        # What is left are feature sections passed by name (dataclasses.replace(cfg, finetune=...)).
        self.sections = {**(sections or {}), **values}

    def __getattr__(self, name: str) -> Any:  # only reached when ordinary lookup fails
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            sections[name] = value
        else:
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain data, core then features (the run's config.yaml)."""
        out = {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "sections"
        }
        out.update({key: dataclasses.asdict(section) for key, section in self.sections.items()})
        return out
