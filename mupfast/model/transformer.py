"""Decoder-only transformer whose init and forward multipliers come from the parametrization table.

``model(tokens)`` returns float32 logits (B, T, V) with the μP output multiplier applied;
``model(tokens, targets)`` returns the mean cross-entropy over targets != -100;
``model(tokens, cache=KVCache(model, batch))`` decodes incrementally (the cache keeps every block's
keys and values); ``model(tokens, targets, doc_ids=…, position_ids=…)`` trains on packed documents,
attention stopping at their boundaries and positions restarting at their starts. Attention and the
readout's loss are ops whose backend (``torch``, ``triton`` or ``auto``) is chosen in
:mod:`mupfast.ops`, not here.

Every multiplier a parameter carries (embedding scale, residual-branch scales, router and output
logits) is read from that parameter's rule (``Rule.forward_mult``), so the table ``mupfast explain``
prints is the model; only the multipliers that belong to no parameter — the attention logits, and
the logits of a readout tied to the embedding — come from the table's global part
(:func:`~mupfast.parametrization.multipliers`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from mupfast.config import ModelConfig
from mupfast.model.indicators import AttentionZ, block_stats, stability_stats
from mupfast.model.moe import SqrtGateMoE
from mupfast.ops.attention import causal_attention
from mupfast.ops.readout import linear_cross_entropy
from mupfast.parametrization import Multipliers, Rule, init_parameters, multipliers, rules_for


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding (half-split layout, as in Llama/NeoX)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, T, D) at positions start…start+T-1, or at ``positions`` (B, T) when given."""
        T = x.shape[-2]
        if positions is not None:  # per token (packed documents restart at 0): (B, 1, T, D/2)
            cos, sin = (table[positions].unsqueeze(1).to(x.dtype) for table in (self.cos, self.sin))
        else:
            cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Every block's keys and values (after RoPE) of the positions decoded so far.

    Buffers are (B, H_kv, max_len, d_head) per block; ``length`` positions are filled. Passing the
    cache to the model places its tokens after those positions and extends it.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int | None = None):
        cfg = model.cfg
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        p = next(model.parameters())
        shape = (batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.blocks]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.blocks]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, scale: float):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.scale = cfg.num_heads, cfg.kv_heads, hd, scale
        self.backend = cfg.attention_backend
        self.q = nn.Linear(d, self.n_heads * hd, bias=cfg.bias)
        self.k = nn.Linear(d, self.n_kv * hd, bias=cfg.bias)
        self.v = nn.Linear(d, self.n_kv * hd, bias=cfg.bias)
        self.o = nn.Linear(self.n_heads * hd, d, bias=cfg.bias)
        self.rotary = Rotary(hd, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        self.z = AttentionZ()

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention; with ``doc_ids`` (B, T) each token attends only within its document;
        ``position_ids`` (B, T) are RoPE's positions (default 0…T-1 after the cache's)."""
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, start, position_ids), self.rotary(k, start, position_ids)
        if cache is not None:
            y = self._cached(q, k, v, cache, layer, start)
        else:
            y, lse = causal_attention(q, k, v, scale=self.scale, backend=self.backend, doc_ids=doc_ids)
            if lse is not None:
                self.z.from_lse(lse)
            elif self.training:  # no lse from this backend: attention Z keeps q, k to compute it when read
                self.z.keep(q, k, doc_ids)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _cached(self, q, k, v, cache: KVCache, layer: int, start: int) -> torch.Tensor:
        """Attention of the new positions over the cache's and their own (SDPA; decoding only)."""
        end = start + q.shape[2]
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        # Query i (position start+i) sees keys 0..start+i; one new token sees everything.
        mask = None
        if q.shape[2] > 1:
            mask = torch.ones(q.shape[2], end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(
            q,
            cache.k[layer][:, :, :end],
            cache.v[layer][:, :, :end],
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.n_kv != self.n_heads,
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.hidden_size, cfg.filter_size, bias=cfg.bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.filter_size, bias=cfg.bias)
        self.down = nn.Linear(cfg.filter_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_scale: float, moe: bool):
        super().__init__()
        self.attn_norm, self.mlp_norm = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg, attention_scale)
        # An MoE block keeps the name `mlp`: the branch is the same residual slot.
        self.mlp = SqrtGateMoE(cfg) if moe else MLP(cfg)
        # Each branch's output multiplier, from the rule of its output matrix (W_o; W_down or the
        # experts'): CompleteP's (L_base / L)^α, hyperp's 1/√(2L), 1 otherwise.
        self.attn_branch_scale = self.mlp_branch_scale = 1.0
        # Instability indicators of the last recorded training forward (detached device scalars, no
        # host sync); ``record_stats`` (Transformer.record_indicators) says whether a forward computes them.
        self.stats: dict[str, torch.Tensor] = {}
        self.record_stats = True

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.attn_branch_scale * self.attn(self.attn_norm(x), cache, layer, doc_ids, position_ids)
        x = x + a
        f = self.mlp_branch_scale * self.mlp(self.mlp_norm(x))
        x = x + f
        if self.training and self.record_stats:
            self.stats = block_stats(a, f, x)
        return x


class Readout(nn.Module):
    """logits = logit_scale · h Wᵀ, and the loss computed without holding all logits at once.

    With tied embeddings the weight is the token embedding's (``shared``); otherwise its own.
    """

    def __init__(self, cfg: ModelConfig, shared: nn.Embedding | None):
        super().__init__()
        self.logit_scale, self.backend = 1.0, cfg.readout_backend  # set from the table by the Transformer
        if shared is None:
            self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.shared = [shared]  # a list keeps the shared module out of this module's parameters
        self.stats: dict[str, torch.Tensor] = {}  # max |logit|, mean lse², detached, no host sync
        self.record_stats = True  # off: a backend without them (Liger) may compute the loss, stats then {}

    def _weight(self) -> torch.Tensor:
        return self.shared[0].weight if self.shared[0] is not None else self.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (h.float() @ self._weight().float().t())

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        loss, stats = linear_cross_entropy(
            h2, self._weight(), t, logit_scale=self.logit_scale, backend=self.backend, stats=self.record_stats
        )
        self.stats = {k: v.detach() for k, v in stats.items()}
        return loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mult = multipliers(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        moe = [cfg.moe_experts > 0 and (i + 1) % cfg.moe_every == 0 for i in range(cfg.num_layers)]
        self.blocks = nn.ModuleList(Block(cfg, mult.attention_scale, moe[i]) for i in range(cfg.num_layers))
        self.lm_loss: torch.Tensor | None = None  # MoE: the LM loss without the auxiliary losses (detached)
        self.final_norm = _norm(cfg)
        self.readout = Readout(cfg, self.tok_emb if cfg.tie_embeddings else None)
        self.embedding_scale = 1.0
        set_forward_multipliers(self, rules_for(self, cfg), mult)

    def hidden(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm output (B, T, d): everything but the readout (after the cache's positions).

        Packed documents: ``doc_ids`` (B, T) keep attention within each document, ``position_ids``
        (B, T) restart the positions (RoPE or the learned table) at each document's start."""
        T = tokens.shape[1]
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if start + T > limit:
            raise ValueError(
                f"sequence length {start + T} exceeds model.max_seq_len ({self.cfg.max_seq_len})"
            )
        if cache is not None and (doc_ids is not None or position_ids is not None):
            raise ValueError("the KV cache decodes one document: no doc_ids or position_ids with it")
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            pos = (
                position_ids
                if position_ids is not None
                else torch.arange(start, start + T, device=tokens.device)
            )
            x = x + self.pos_emb(pos)
        x = x * self.embedding_scale
        for i, block in enumerate(self.blocks):
            # The layer index only addresses the KV cache: without one every block gets 0, so torch.compile
            # traces one graph for all blocks (torch 2.11 specialises an int passed through checkpoint and
            # recompiled the checkpointed block for layer 1).
            x = block(x, cache, i if cache is not None else 0, doc_ids, position_ids)
        if cache is not None:
            cache.length = start + T
        return self.final_norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.hidden(tokens, cache, doc_ids=doc_ids, position_ids=position_ids)
        if targets is None:
            return self.readout.logits(h)
        loss = self.readout.loss(h, targets)
        moe = [b.mlp for b in self.blocks if isinstance(b.mlp, SqrtGateMoE) and b.mlp.aux_loss is not None]
        if not moe:
            return loss
        # Training with MoE: the auxiliary losses, averaged over MoE blocks so the coefficients do not
        # change meaning with depth (a perfectly balanced router adds exactly moe_aux_loss_coef).
        self.lm_loss = loss.detach()
        c = self.cfg
        loss = loss + c.moe_aux_loss_coef * torch.stack([m.aux_loss for m in moe]).mean()
        if c.moe_router_z_coef:
            loss = loss + c.moe_router_z_coef * torch.stack([m.router_z for m in moe]).mean()
        for m in moe:  # the graph-holding tensors are used once
            m.aux_loss = m.router_z = None
        return loss

    #: Model keys that only set forward multipliers: they may change on a built model.
    MULTIPLIER_KEYS = ("embeddings_scale", "output_logits_alpha", "attention_logits_alpha")

    def set_multipliers(self, **values: float) -> None:
        """Change forward multipliers (:data:`MULTIPLIER_KEYS`) of the built model; the next forward
        uses them. Weights are untouched: init-time keys (init_std, …) cannot change here."""
        unknown = set(values) - set(self.MULTIPLIER_KEYS)
        if unknown:
            raise ValueError(
                f"set_multipliers: {sorted(unknown)} are not forward multipliers ({self.MULTIPLIER_KEYS})"
            )
        self.cfg = dataclasses.replace(self.cfg, **values)
        mult = multipliers(self.cfg)
        for block in self.blocks:
            block.attn.scale = mult.attention_scale
        # The base model's sites only: an attached adapter keeps the multipliers it was built with.
        set_forward_multipliers(self, rules_for(self, self.cfg, own_rules=False), mult)

    def record_indicators(self, enabled: bool) -> None:
        """Whether the next training forwards compute the blocks' stability indicators: branch RMS,
        outlier share, (torch backend) the q and k that attention Z is computed from, and the readout's
        max |logit| and mean lse² (off, ``auto`` may take a readout that has none).

        The trainer turns it on only for the last micro-batch of a step whose metrics it logs, so the
        other steps pay nothing for them and hold no activations past their backward. On by default."""
        for block in self.blocks:
            block.record_stats = enabled
            block.attn.z.record = enabled
        self.readout.record_stats = enabled

    def stability_stats(self) -> dict[str, torch.Tensor]:
        """The indicators of the last forward (:func:`mupfast.model.indicators.stability_stats`)."""
        return stability_stats(self)


def _one_value(rules: list[Rule], what: str) -> float:
    """The forward multiplier the rules of one site agree on (a site the table splits is a bug)."""
    values = {r.forward_mult for r in rules}
    if len(values) != 1:
        raise AssertionError(f"{what}: the rules give different forward multipliers {sorted(values)}")
    return values.pop()


def set_forward_multipliers(model: Transformer, rules: list[Rule], mult: Multipliers) -> None:
    """Give every module the forward multiplier its parameters' rules carry (module docstring)."""
    by_component: dict[tuple[str, int | None], list[Rule]] = {}
    for r in rules:
        by_component.setdefault((r.component, r.layer), []).append(r)
    embedding = by_component[("embedding", None)] + by_component.get(("pos_embedding", None), [])
    model.embedding_scale = _one_value(embedding, "embedding")
    for i, block in enumerate(model.blocks):
        block.attn_branch_scale = _one_value(by_component[("o", i)], f"block {i} attention output")
        outputs = by_component.get(("ffn_out", i)) or by_component[("expert_out", i)]
        block.mlp_branch_scale = _one_value(outputs, f"block {i} MLP output")
        if isinstance(block.mlp, SqrtGateMoE):
            block.mlp.router_scale = _one_value(by_component[("router", i)], f"block {i} router")
    readout = by_component.get(("readout", None))
    # A readout tied to the embedding has no rule of its own: its logit multiplier is the table's.
    model.readout.logit_scale = _one_value(readout, "readout") if readout else mult.logit_scale


def build_model(cfg: ModelConfig, *, device: torch.device | str | None = None) -> Transformer:
    """Build the model and initialise every parameter from its rule (global torch RNG)."""
    model = Transformer(cfg)
    if device is not None:
        model.to(device)
    init_parameters(model, rules_for(model, cfg))
    return model
