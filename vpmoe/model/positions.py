"""Position encodings: RoPE (compat), GRAPE-M (learnable rotary frequencies, local layers), GRAPE-A (ALiBi slopes,
global layers).

Rotary pairs follow Hugging Face's "rotate_half" convention: dims i and i + head_dim/2 form a pair.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/head_dim), computed exactly as Hugging Face does (fp32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponents)


def grape_log_freq_init(head_dim: int, base: float, scale: float, device=None) -> torch.Tensor:
    """The stored GRAPE-M parameter, `scale * log(theta_i)`, in fp32 (computed in float64, then rounded once)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    return (scale * (-(i / head_dim) * math.log(base))).float()


def grape_inv_freq(log_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """theta_i from the stored parameter, always in fp32 or wider (the parameter may arrive in a lower dtype)."""
    return torch.exp(log_freq.to(torch.promote_types(log_freq.dtype, torch.float32)) / scale)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, S, head_dim] for positions [B, S]; angles in the dtype of inv_freq (fp32 or wider)."""
    angles = position_ids.to(inv_freq.dtype)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by cos/sin [B, S, D]. The product runs in the wider of the two dtypes, so gradients
    reach learnable frequencies in fp32 even when activations are bf16."""
    dtype = x.dtype
    wide = torch.promote_types(dtype, cos.dtype)
    cos, sin = cos[:, :, None, :].to(wide), sin[:, :, None, :].to(wide)
    x = x.to(wide)
    return (x * cos + rotate_half(x) * sin).to(dtype)


def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """Fixed ALiBi slopes 2^(-8(h+1)/H): 2^-1 ... 2^-8 for 8 heads (GRAPE-A's ALiBi special case)."""
    h = torch.arange(1, n_heads + 1, dtype=torch.float32, device=device)
    return torch.pow(2.0, -8.0 * h / n_heads)
