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


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor,
    distance: torch.Tensor,
    alibi: bool,
    sinks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per row against a preallocated cache: q [B, H, 1, D], k and v [B, Hkv, S, D] (S cache slots),
    visible [B, S] the slots this row's query may see, distance [B, S] the query's token index minus each slot's.

    The math of reference_attention, shaped for decoding: GQA as a reshape of q (K and V are read once, never
    repeated), scores and softmax in fp32 (or wider) straight from low-precision operands; the probabilities meet
    V in V's dtype, as fused attention kernels do."""
    batch, n_heads, _, dim = q.shape
    n_kv, slots = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    scores = _wide_bmm(q.reshape(batch * n_kv, group, dim), k.reshape(batch * n_kv, slots, dim).transpose(1, 2))
    scores = scores.view(batch, n_heads, slots) * scale
    if alibi:
        slopes = alibi_slopes(n_heads, device=q.device).to(scores.dtype)
        scores = scores - slopes[None, :, None] * distance[:, None, :].to(scores.dtype)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(scores.dtype)[None, :, None].expand(batch, n_heads, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = _wide_bmm(probs.to(v.dtype).reshape(batch * n_kv, group, slots), v.reshape(batch * n_kv, slots, dim))
    return out.view(batch, n_heads, 1, dim).to(q.dtype)


@torch.compiler.disable  # Inductor has no GEMM choice for bmm with out_dtype (torch 2.11): cuBLAS runs it eagerly
def _wide_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 (or wider) output; on CUDA, low-precision operands go to cuBLAS as they are (fp32
    accumulation and output), without upcast copies of the cache. Always eager: a compiled decode step calls it
    between its compiled parts (the step's CUDA graph captures both)."""
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.dtype != wide and a.is_cuda:
        return torch.bmm(a, b, out_dtype=wide)
    return torch.bmm(a.to(wide), b.to(wide))


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
