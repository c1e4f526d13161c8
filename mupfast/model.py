"""Decoder-only transformer whose init and multipliers come from the parametrization table.

``model(tokens)`` returns float32 logits (B, T, V) with the μP output multiplier applied;
``model(tokens, targets)`` returns the mean cross-entropy over targets != -100. Attention and the
readout go through a backend switch: ``torch`` (SDPA with scale = α/d, chunked cross-entropy) or
``triton`` (the kernels of mupfast.kernels); ``auto`` picks Triton on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mupfast.config import ModelConfig
from mupfast.moe import SqrtGateMoE
from mupfast.parametrization import init_parameters, multipliers, rules_for


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "auto":
        return x.is_cuda
    return backend == "triton"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D)
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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
        self.lse_sq_mean: torch.Tensor | None = None  # attention-Z indicator (see attention_z())
        self._z_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.record_z = True  # Transformer.record_attention_z: whether a training forward keeps q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        if _use_triton(self.backend, x):
            from mupfast.kernels.attention import mup_attention

            y, lse = mup_attention(q, k, v, scale=self.scale, causal=True, return_lse=True)
            self.lse_sq_mean, self._z_inputs = lse.detach().square().mean(), None
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
            )
            # SDPA gives no lse: keep q, k for attention_z() when the trainer will read it (record_z; autograd
            # holds them until the backward, we until they are read or the next training forward)
            if self.training:
                kept = (q.detach(), k.detach()) if self.record_z else None
                self.lse_sq_mean, self._z_inputs = None, kept
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attention_z(self) -> torch.Tensor | None:
        """Mean lse² of the attention logits of the last training forward. The Triton kernel returns lse
        for free; on the torch path it is computed here, on demand, from the kept q and k, so only the
        steps whose indicators are read pay for it."""
        if self._z_inputs is not None:
            self.lse_sq_mean = attention_lse(*self._z_inputs, self.scale).square().mean()
            self._z_inputs = None
        return self.lse_sq_mean


@torch.no_grad()
def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """logsumexp over keys of scale·q·kᵀ (causal), (B, Hq, T) in fp32 (fp64 stays fp64); GQA as SDPA's."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    B, H, T, _ = q.shape
    rows = max(1, 2**24 // max(1, B * H * k.shape[2]))  # bound the score block to 64 MiB of fp32
    cols = torch.arange(k.shape[2], device=q.device)
    out = []
    for s in range(0, T, rows):
        scores = (q[:, :, s : s + rows] @ k.transpose(-1, -2)) * scale
        if causal:
            r = torch.arange(s, s + scores.shape[2], device=q.device)
            scores.masked_fill_(cols[None, :] > r[:, None], float("-inf"))
        out.append(scores.logsumexp(-1))
    return torch.cat(out, dim=2)


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


def outlier_share(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Share of elements with |x − μ_token| > k·σ_token (μ, σ over the last dim); a device scalar."""
    x = x.detach().float()
    mu = x.mean(-1, keepdim=True)
    sigma = x.std(-1, keepdim=True, correction=0)
    return ((x - mu).abs() > k * sigma).float().mean()


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        attention_scale: float,
        residual_scale: float,
        moe_router_scale: float | None = None,
    ):
        super().__init__()
        self.attn_norm, self.mlp_norm = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg, attention_scale)
        # An MoE block (moe_router_scale given) keeps the name `mlp`: the branch is the same residual slot.
        self.mlp = MLP(cfg) if moe_router_scale is None else SqrtGateMoE(cfg, moe_router_scale)
        self.residual_scale = residual_scale  # CompleteP: (L_base / L)^α; hyperp: 1/√(2L); 1 otherwise
        # Instability indicators of the last training forward (detached device scalars, no host sync):
        # RMS of each residual branch's contribution, and the outlier share of the block output.
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.residual_scale * self.attn(self.attn_norm(x))
        x = x + a
        f = self.residual_scale * self.mlp(self.mlp_norm(x))
        x = x + f
        if self.training:
            self.stats = {
                "attn_branch_rms": a.detach().float().square().mean().sqrt(),
                "mlp_branch_rms": f.detach().float().square().mean().sqrt(),
                "outlier_share": outlier_share(x),
            }
        return x


class Readout(nn.Module):
    """logits = logit_scale · h Wᵀ, and the loss computed without holding all logits at once.

    With tied embeddings the weight is the token embedding's (``shared``); otherwise its own.
    """

    def __init__(self, cfg: ModelConfig, logit_scale: float, shared: nn.Embedding | None):
        super().__init__()
        self.logit_scale, self.backend = logit_scale, cfg.readout_backend
        if shared is None:
            self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.shared = [shared]  # a list keeps the shared module out of this module's parameters
        self.stats: dict[str, torch.Tensor] = {}  # max |logit|, mean lse², detached, no host sync

    def _weight(self) -> torch.Tensor:
        return self.shared[0].weight if self.shared[0] is not None else self.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (h.float() @ self._weight().float().t())

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if _use_triton(self.backend, h):
            from mupfast.kernels.cross_entropy import fused_linear_cross_entropy as fn
        else:
            from mupfast.kernels.cross_entropy import linear_cross_entropy_reference as fn
        loss, stats = fn(h2, self._weight(), t, logit_scale=self.logit_scale, return_stats=True)
        self.stats = {k: v.detach() for k, v in stats.items()}
        return loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mult = multipliers(cfg)
        self.embedding_scale = mult.embedding_scale
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        moe = [cfg.moe_experts > 0 and (i + 1) % cfg.moe_every == 0 for i in range(cfg.num_layers)]
        self.blocks = nn.ModuleList(
            Block(cfg, mult.attention_scale, mult.residual_scale, mult.router_scale if moe[i] else None)
            for i in range(cfg.num_layers)
        )
        self.lm_loss: torch.Tensor | None = None  # MoE: the LM loss without the auxiliary losses (detached)
        self.final_norm = _norm(cfg)
        self.readout = Readout(cfg, mult.logit_scale, self.tok_emb if cfg.tie_embeddings else None)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm output (B, T, d): everything but the readout."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        x = x * self.embedding_scale
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(tokens)
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

    def record_attention_z(self, enabled: bool) -> None:
        """Whether the next training forwards keep q and k for attention Z on the torch backend.

        The trainer turns it on only for the last micro-batch of a step whose indicators it logs, so
        the other steps hold no activations past their backward. On by default."""
        for block in self.blocks:
            block.attn.record_z = enabled

    def stability_stats(self) -> dict[str, torch.Tensor]:
        """Detached device tensors from the last forward: readout max |logit| and mean lse²;
        from the last training forward, averaged over blocks: attention Z (mean lse², computed here on
        the torch backend), attention and MLP branch-output RMS and the outlier share
        (|x − μ_token| > 5σ_token) of the residual stream after each block; with MoE, averaged over
        MoE blocks, the balance loss, router Z and MaxVio, and the LM loss without them (lm_loss)."""
        stats = dict(self.readout.stats)
        attn_z = [z for b in self.blocks if (z := b.attn.attention_z()) is not None]
        if attn_z:
            stats["attn_lse_sq_mean"] = torch.stack(attn_z).mean()
        for key in ("attn_branch_rms", "mlp_branch_rms", "outlier_share"):
            per_block = [b.stats[key] for b in self.blocks if key in b.stats]
            if per_block:
                stats[key] = torch.stack(per_block).mean()
        for key in ("moe_aux_loss", "router_z", "moe_max_vio"):
            per_block = [b.mlp.stats[key] for b in self.blocks if key in getattr(b.mlp, "stats", {})]
            if per_block:
                stats[key] = torch.stack(per_block).mean()
        if self.lm_loss is not None:
            stats["lm_loss"] = self.lm_loss
        return stats


def build_model(cfg: ModelConfig, *, device: torch.device | str | None = None) -> Transformer:
    """Build the model and initialise every parameter from its rule (global torch RNG)."""
    model = Transformer(cfg)
    if device is not None:
        model.to(device)
    init_parameters(model, rules_for(model, cfg))
    return model
