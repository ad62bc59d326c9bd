"""Parameter counts from the instantiated module shapes (on the meta device, so nothing is allocated)."""

from __future__ import annotations

import torch

from vpmoe.model.config import ModelConfig
from vpmoe.model.naming import FREEZE_GROUPS, KINDS, freeze_group, param_kind
from vpmoe.model.transformer import Transformer


def count_params(cfg: ModelConfig) -> dict:
    """total, active per token (router, shared expert and top-k routed experts of each MoE layer), and breakdowns
    by freeze group (`components`) and by optimizer role (`kinds`)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    components = dict.fromkeys(FREEZE_GROUPS, 0)
    kinds = dict.fromkeys(KINDS, 0)
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        components[freeze_group(name)] += param.numel()
        kinds[param_kind(name)] += param.numel()
    inactive = 0
    for layer in model.moe_layers:
        experts = model.layers[layer].mlp.experts
        per_expert = sum(p.numel() for p in experts.parameters()) // cfg.moe.n_experts
        inactive += (cfg.moe.n_experts - cfg.moe.topk) * per_expert
    return {
        "object": cfg.model.name,
        "total": total,
        "active": total - inactive,
        "components": components,
        "kinds": kinds,
        "layers": {
            "total": cfg.model.n_layers,
            "local": sum(cfg.layer_kind(layer) == "local" for layer in range(cfg.model.n_layers)),
            "global": sum(cfg.layer_kind(layer) == "global" for layer in range(cfg.model.n_layers)),
            "moe": len(model.moe_layers),
        },
    }
