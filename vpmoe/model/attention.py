"""Attention block: projections (GQA or TPA), QK-norm, positions, value residual, sinks, output projection.

Layer kinds (ModelConfig.layer_kind):
- full   (compat mode): GQA, QK-norm, RoPE, full causal attention, no biases, no sinks.
- local  (real mode):   TPA q/k/v, qkv biases, QK-norm, GRAPE-M, sliding window, sinks.
- global (real mode):   GQA with biases, QK-norm, no rotation (NoPE), ALiBi (GRAPE-A), sinks.
QK-norm runs before any rotation; value residual mixing happens on the materialized V (after bias, never rotated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vpmoe.model import attention_ops
from vpmoe.model.config import ModelConfig
from vpmoe.model.norms import RMSNorm
from vpmoe.model.positions import apply_rotary, grape_inv_freq, grape_log_freq_init, rotary_cos_sin


class StaticBlockMasks:
    """Block masks whose tensors keep their addresses from one forward to the next, refilled in place (one set per
    window and shape). CUDA graphs replay kernels that read their inputs at the addresses seen at capture, so the
    masks (and the document ids their mask function reads) must stay where they were. A refill overwrites the
    masks that the previous forward's backward reads: one forward, then its backward, as a training step runs."""

    _TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def __init__(self) -> None:
        self._masks: dict = {}

    def get(self, doc_ids: torch.Tensor, window: int | None):
        key = (window, tuple(doc_ids.shape), doc_ids.device)
        if key not in self._masks:
            doc_buffer = doc_ids.clone()  # the mask function reads documents from here
            self._masks[key] = doc_buffer, attention_ops.document_block_mask(doc_buffer, window)
            return self._masks[key][1]
        doc_buffer, mask = self._masks[key]
        doc_buffer.copy_(doc_ids)
        fresh = attention_ops.document_block_mask(doc_buffer, window)
        for name in self._TENSORS:
            kept = getattr(mask, name)
            if kept is not None:
                kept.copy_(getattr(fresh, name))
        return mask


@dataclass
class AttentionContext:
    """What every attention layer of one forward shares. Built once per forward by the Transformer."""

    position_ids: torch.Tensor  # [B, S]
    doc_ids: torch.Tensor  # [B, S]
    token_index: torch.Tensor  # [S] absolute index of each query in its stream (offset by a KV cache)
    kernel: str  # "reference" or "flex"
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # compat-mode cos/sin, shared by all layers
    static_masks: StaticBlockMasks | None = None  # set when the blocks replay as CUDA graphs
    _block_masks: dict = field(default_factory=dict)

    def block_mask(self, window: int | None):
        if window not in self._block_masks:
            if self.static_masks is not None:
                self._block_masks[window] = self.static_masks.get(self.doc_ids, window)
            else:
                self._block_masks[window] = attention_ops.document_block_mask(self.doc_ids, window)
        return self._block_masks[window]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a = cfg.attention
        dim = cfg.model.hidden_size
        self.kind = cfg.layer_kind(layer)
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.window = a.window if self.kind == "local" else None
        self.alibi = self.kind == "global"
        self.scale = 1.0 / math.sqrt(a.head_dim)
        self.grape_scale = a.grape_log_freq_scale
        self.rope_base = a.rope_base
        q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        if self.kind == "local":
            self.q_a, self.q_b = _tpa_pair(dim, a.n_heads, a.tpa_q_rank, a.head_dim)
            self.k_a, self.k_b = _tpa_pair(dim, a.n_kv_heads, a.tpa_kv_rank, a.head_dim)
            self.v_a, self.v_b = _tpa_pair(dim, a.n_kv_heads, a.tpa_kv_rank, a.head_dim)
            self.q_bias = nn.Parameter(torch.zeros(q_dim))
            self.k_bias = nn.Parameter(torch.zeros(kv_dim))
            self.v_bias = nn.Parameter(torch.zeros(kv_dim))
            self.grape_log_freq = nn.Parameter(
                grape_log_freq_init(a.head_dim, a.rope_base, a.grape_log_freq_scale))
        else:
            self.q_proj = nn.Linear(dim, q_dim, bias=cfg.real)
            self.k_proj = nn.Linear(dim, kv_dim, bias=cfg.real)
            self.v_proj = nn.Linear(dim, kv_dim, bias=cfg.real)
        self.o_proj = nn.Linear(q_dim, dim, bias=cfg.real)
        self.q_norm = RMSNorm(a.head_dim, cfg.model.norm_eps)
        self.k_norm = RMSNorm(a.head_dim, cfg.model.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(a.n_heads)) if cfg.real else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, S, H, hd], k and v [B, S, Hkv, hd], biases included, before norm and rotation.

        All projections of x run as one GEMM over the concatenated weights (one wide product instead of up to
        six narrow ones); the parameters stay separate."""
        batch, seq, _ = x.shape
        if self.kind == "local":
            qa, ka, va, qb, kb, vb = fused_linear(x, [self.q_a, self.k_a, self.v_a, self.q_b, self.k_b, self.v_b])
            q = _tpa(qa, qb, self.n_heads, self.head_dim) + self.q_bias.view(self.n_heads, -1)
            k = _tpa(ka, kb, self.n_kv_heads, self.head_dim) + self.k_bias.view(self.n_kv_heads, -1)
            v = _tpa(va, vb, self.n_kv_heads, self.head_dim) + self.v_bias.view(self.n_kv_heads, -1)
            return q, k, v
        q, k, v = fused_linear(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        v_first: torch.Tensor | None = None,
        value_mix: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output [B, S, D], this layer's materialized V [B, S, Hkv, hd] before any value mixing).

        value_mix is lambda = sigmoid(value_residual_logit): v <- (1 - lambda) * v + lambda * v_first."""
        q, k, v, materialized_v = self.heads(x, ctx.position_ids, ctx.rope, v_first, value_mix)
        if cache is None and ctx.kernel == "flex":
            out = attention_ops.flex_attention(
                q, k, v, block_mask=ctx.block_mask(self.window), alibi=self.alibi, sinks=self.sinks, scale=self.scale)
        else:
            k_index, k_doc = ctx.token_index, ctx.doc_ids
            if cache is not None:
                k, v, k_index, k_doc = cache.update(k, v, ctx.token_index, ctx.doc_ids)
            out = attention_ops.reference_attention(
                q, k, v, q_index=ctx.token_index, k_index=k_index, q_doc=ctx.doc_ids, k_doc=k_doc,
                window=self.window, alibi=self.alibi, sinks=self.sinks, scale=self.scale)
        return self.merge(out), materialized_v

    def heads(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        v_first: torch.Tensor | None = None,
        value_mix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention inputs q [B, H, S, hd], k and v [B, Hkv, S, hd] (normed, rotated, value-mixed) and this
        layer's materialized V [B, S, Hkv, hd]. position_ids [B, S] drive GRAPE-M (local layers); rope is the
        compat-mode cos/sin (AttentionContext.rope). The sampler (vpmoe.model.sample) attends over its own cache."""
        q, k, v = self.project(x)
        materialized_v = v
        if value_mix is not None:
            v = (1 - value_mix) * v + value_mix * v_first
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "local":
            cos, sin = rotary_cos_sin(position_ids, grape_inv_freq(self.grape_log_freq, self.grape_scale))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif self.kind == "full":
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), materialized_v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [B, H, S, hd] -> the output projection [B, S, D]."""
        batch, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for name, module in self.named_children():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if name == "o_proj" else init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        if self.kind == "local":
            # Start TPA near GQA: head h reads token factor h mod R (see _tpa).
            for a_proj, n_heads in ((self.q_a, self.n_heads), (self.k_a, self.n_kv_heads), (self.v_a, self.n_kv_heads)):
                rank = a_proj.out_features // n_heads
                bias = torch.zeros(n_heads, rank)
                bias[torch.arange(n_heads), torch.arange(n_heads) % rank] = float(rank)
                a_proj.bias.copy_(bias.flatten())
            for bias in (self.q_bias, self.k_bias, self.v_bias):
                nn.init.zeros_(bias)
            self.grape_log_freq.copy_(grape_log_freq_init(self.head_dim, self.rope_base, self.grape_scale))
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)


def _tpa_pair(dim: int, n_heads: int, rank: int, head_dim: int) -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(dim, n_heads * rank, bias=True), nn.Linear(dim, rank * head_dim, bias=False)


def fused_linear(x: torch.Tensor, layers: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """[layer(x) for layer in layers] as one GEMM over the concatenated weights (absent biases count as 0)."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])
    return torch.nn.functional.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def _tpa(heads: torch.Tensor, tokens: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Tensor Product Attention factors: x_h = (1/R) * sum_r A[h, r] * B[r, :] -> [B, S, n_heads, head_dim], from
    the head factors A(x) [B, S, n_heads * R] and the token factors B(x) [B, S, R * head_dim].

    With a.weight = 0 and a.bias = R * onehot(h) for head h (R >= n_heads), head h equals row block h of b:
    a GQA projection embeds exactly. The rank is tiny (2 or 4): a broadcast multiply-sum, which compiles to one
    fused kernel, instead of a batched matmul of [H, R] @ [R, hd] per token."""
    batch, seq, _ = heads.shape
    rank = heads.shape[-1] // n_heads
    heads = heads.view(batch, seq, n_heads, rank, 1)
    tokens = tokens.view(batch, seq, 1, rank, head_dim)
    return (heads * tokens).sum(-2) / rank
