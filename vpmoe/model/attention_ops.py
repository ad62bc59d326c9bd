"""The attention computation itself, two ways behind one contract.

Inputs: q [B, H, Sq, D], k and v [B, Hkv, Sk, D] (query head h reads KV head h // (H / Hkv), as HF's repeat_kv).
Query i may see key j when j <= i (token index), i - j < window (local layers) and both are in the same document.
ALiBi adds -slope_h * (i - j) to the scaled logit; within a document the token distance equals the position
distance, so ALiBi needs no position ids. A sink s_h adds exp(s_h) to the softmax denominator and carries no value.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention import flex_attention as flex

from vpmoe.model.kernels import allow_recompiles
from vpmoe.model.positions import alibi_slopes


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_doc: torch.Tensor,
    k_doc: torch.Tensor,
    window: int | None,
    alibi: bool,
    sinks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Plain math in fp32 (or wider): the oracle, and the path for CPU and for KV-cache decoding."""
    batch, n_heads, q_len, _ = q.shape
    repeat = n_heads // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    k = k.to(wide).repeat_interleave(repeat, dim=1)
    v = v.to(wide).repeat_interleave(repeat, dim=1)
    scores = (q.to(wide) @ k.transpose(-1, -2)) * scale
    distance = q_index[:, None] - k_index[None, :]  # [Sq, Sk]
    if alibi:
        slopes = alibi_slopes(n_heads, device=q.device).to(wide)
        scores = scores - slopes[:, None, None] * distance.to(wide)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None] & (q_doc[:, :, None] == k_doc[:, None, :])  # [B, Sq, Sk]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(wide)[None, :, None, None].expand(batch, n_heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(q.dtype)


def document_block_mask(doc_ids: torch.Tensor, window: int | None) -> flex.BlockMask:
    """Causal + same-document (+ window) block mask for a full-sequence forward, doc_ids [B, S]."""
    batch, seq = doc_ids.shape

    def causal_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    def causal_document_window(b, h, q_idx, kv_idx):
        return causal_document(b, h, q_idx, kv_idx) & (q_idx - kv_idx < window)

    mask_mod = causal_document if window is None else causal_document_window
    return flex.create_block_mask(mask_mod, batch, None, seq, seq, device=doc_ids.device)


@functools.cache
def _alibi_score_mod(n_heads: int, device: torch.device):
    # One function object per (heads, device), so the compiled kernel is reused across steps and layers.
    slopes = alibi_slopes(n_heads, device=device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return alibi


@functools.cache
def _compiled_flex_attention():
    allow_recompiles()  # one compiled kernel per (shape, mask kind, ALiBi or not)
    return torch.compile(flex.flex_attention, dynamic=False)


def flex_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_mask: flex.BlockMask,
    alibi: bool,
    sinks: torch.Tensor | None,
    scale: float,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention for a full sequence; sinks enter through the returned log-sum-exp (differentiable):
    softmax with an extra exp(s) in the denominator = plain softmax * sigmoid(lse - s)."""
    attend = _compiled_flex_attention() if compiled else flex.flex_attention
    score_mod = _alibi_score_mod(q.shape[1], q.device) if alibi else None
    out, aux = attend(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True,
        return_aux=flex.AuxRequest(lse=True),
    )
    return out if sinks is None else apply_sinks(out, aux.lse, sinks)


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Fused sink form: out [B, H, S, D] and lse [B, H, S] of the plain softmax; exp(s_h) joins the denominator,
    which rescales the output by sum / (sum + exp(s)) = sigmoid(lse - s). Differentiable in lse."""
    wide = torch.promote_types(lse.dtype, torch.float32)
    keep = torch.sigmoid(lse.to(wide) - sinks.to(wide)[None, :, None])
    return (out.to(wide) * keep[..., None]).to(out.dtype)
