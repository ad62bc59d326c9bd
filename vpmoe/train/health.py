"""Router health from tokens-per-expert counts, and the collapse detector.

For a layer with counts n_i over E experts (top-K routing): load share p_i = n_i / sum(n);
CV % = 100 * std(n) / mean(n); max load % = 100 * max(p); entropy = -sum p_i log p_i (nats; log E when
balanced); active = experts with n_i > 0. If every token went to the same K experts equally, CV would be
100 * sqrt((E - K) / K): a layer with at most K + 1 active experts and a CV near that has collapsed.
"""

from __future__ import annotations

import math

import torch

COLLAPSE_CV_FRACTION = 0.9


def layer_health(counts: torch.Tensor, expert_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer metrics from counts [L, E] and expert_bias [L, E]; each value is a [L] tensor."""
    n = counts.double()
    total = n.sum(-1, keepdim=True).clamp(min=1)
    p = n / total
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    active = (counts > 0).sum(-1)
    return {
        "cv_pct": 100 * n.std(-1, unbiased=False) / n.mean(-1).clamp(min=1e-12),
        "max_load_pct": 100 * p.max(-1).values,
        "entropy": entropy,
        "experts_active": active.double(),
        "dead_experts": (counts.shape[-1] - active).double(),
        "bias_range": (expert_bias.max(-1).values - expert_bias.min(-1).values).double(),
    }


def aggregate(per_layer: dict[str, torch.Tensor]) -> dict[str, float]:
    cv = per_layer["cv_pct"]
    return {
        "mean_cv_pct": cv.mean().item(),
        "std_cv_pct": cv.std(unbiased=False).item(),
        "mean_entropy": per_layer["entropy"].mean().item(),
        "min_entropy": per_layer["entropy"].min().item(),
        "mean_max_load_pct": per_layer["max_load_pct"].mean().item(),
        "dead_experts_count": per_layer["dead_experts"].sum().item(),
        "experts_active_mean": per_layer["experts_active"].mean().item(),
        "expert_bias_range": per_layer["bias_range"].max().item(),
    }


def collapsed_layers(per_layer: dict[str, torch.Tensor], n_experts: int, topk: int) -> list[int]:
    """Indices (into the MoE layers) of layers whose routing has collapsed onto about top_k experts."""
    limit = COLLAPSE_CV_FRACTION * 100 * math.sqrt((n_experts - topk) / topk)
    bad = (per_layer["experts_active"] <= topk + 1) & (per_layer["cv_pct"] >= limit)
    return bad.nonzero().flatten().tolist()
