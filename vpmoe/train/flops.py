"""Model FLOPs per token, for MFU.

Per token, forward: 2 FLOPs per active matmul weight (every linear layer and expert that the token passes
through, the output head included, the embedding lookup excluded), plus attention scores and values:
2 * 2 * n_heads * head_dim FLOPs per visible key (QK^T and PV). Causal layers see (S + 1) / 2 keys on average
over a sequence of S; windowed layers see the mean of min(i + 1, window). Training = 3 x forward
(backward costs two forward matmuls). MFU = achieved model FLOPs/s / the device's dense bf16 peak.
"""

from __future__ import annotations

import torch

from vpmoe.model.config import ModelConfig
from vpmoe.model.params import count_params

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device name.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def visible_keys(seq_len: int, window: int | None) -> float:
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def train_flops_split(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by component: attention scores and values, routed expert GEMMs, and every other
    matmul (projections, shared expert, dense FFN, router, head)."""
    counts = count_params(cfg)
    dense = counts["kinds"]["matrix"] + counts["kinds"]["router"] + counts["kinds"]["head"]
    # Routed experts: only top_k of them per token.
    experts = counts["kinds"]["expert_bank"]
    if cfg.moe.enabled:
        experts = experts * cfg.moe.topk / cfg.moe.n_experts
    a = cfg.attention
    attention = 0.0
    for layer in range(cfg.model.n_layers):
        window = a.window if cfg.layer_kind(layer) == "local" else None
        attention += 4 * a.n_heads * a.head_dim * visible_keys(seq_len, window)
    return {"attention": 3 * attention, "experts": 3 * 2 * experts, "dense": 3 * 2 * dense}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return sum(train_flops_split(cfg, seq_len).values())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def measured_matmul_flops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    """The dense bf16 matmul rate of this GPU right now (FLOP/s of an n x n x n product), the MFU denominator
    of the benchmark: nominal peaks are not reached by any real kernel."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000)
