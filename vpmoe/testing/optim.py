"""Test support: float64 reference optimizers written from the formulas, and modules built from naming.py names.

Used by tests/test_optim_*.py and benchmarks/bench_optim.py; not used in training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vpmoe.optim.polar import polar_express_coefficients


def module_from_shapes(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> nn.Module:
    """An nn.Module whose named_parameters() are exactly `shapes` (dotted names become nested modules)."""
    gen = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(0.1 * torch.randn(shape, generator=gen, dtype=dtype)))
    return root


def small_model_shapes(d: int = 24, e: int = 4, h: int = 6, vocab: int = 50) -> dict[str, tuple[int, ...]]:
    """One of every kind, with the naming contract's names (layer 0 local/dense, layer 1 global/MoE)."""
    return {
        "embed.weight": (vocab, d),
        "layers.0.attn_norm.weight": (d,),
        "layers.0.attn.q_a.weight": (8, d),
        "layers.0.attn.q_a.bias": (8,),
        "layers.0.attn.q_b.weight": (16, d),
        "layers.0.attn.k_a.weight": (4, d),
        "layers.0.attn.k_b.weight": (16, d),
        "layers.0.attn.o_proj.weight": (d, d),
        "layers.0.attn.q_bias": (16,),
        "layers.0.attn.sinks": (4,),
        "layers.0.attn.grape_log_freq": (4,),
        "layers.0.attn.q_norm.weight": (8,),
        "layers.0.mlp_norm.weight": (d,),
        "layers.0.mlp.up.weight": (40, d),
        "layers.0.mlp.down.weight": (d, 40),
        "layers.1.value_residual_logit": (1,),
        "layers.1.attn.q_proj.weight": (16, d),
        "layers.1.attn.k_proj.weight": (8, d),
        "layers.1.attn.o_proj.weight": (d, 16),
        "layers.1.attn.o_proj.bias": (d,),
        "layers.1.mlp.router.weight": (e, d),
        "layers.1.mlp.shared.up.weight": (12, d),
        "layers.1.mlp.shared.down.weight": (d, 12),
        "layers.1.mlp.experts.up": (e, h, d),
        "layers.1.mlp.experts.down": (e, d, h),
        "layers.1.mlp.experts.up_bias": (e, h),
        "final_norm.weight": (d,),
        "head.weight": (vocab, d),
    }


def make_grads(shapes: dict[str, tuple[int, ...]], steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(steps)]


# ---- float64 references written from the formulas -----------------------------------------------------------------

_COEFFS = polar_express_coefficients()


def ref_polar(x: np.ndarray) -> np.ndarray:
    t = x.shape[0] > x.shape[1]
    if t:
        x = x.T
    x = x / (np.linalg.norm(x) * 1.02 + 1e-6)
    for a, b, c in _COEFFS:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if t else x


class RefNorMuon:
    """Per matrix, float64: momentum (Nesterov), Polar Express, per-row second moment, Frobenius restore, scale."""

    def __init__(self, w: np.ndarray, momentum=0.95, beta2=0.95, wd=0.1, scale=0.2, nesterov=True):
        self.w = w.astype(np.float64).copy()
        self.m = np.zeros_like(self.w)
        self.v = np.zeros(self.w.shape[:-1])
        self.beta, self.beta2, self.wd, self.scale, self.nesterov = momentum, beta2, wd, scale, nesterov

    def step(self, g: np.ndarray, lr: float) -> None:
        g = g.astype(np.float64)
        self.m = self.beta * self.m + (1 - self.beta) * g
        u = (1 - self.beta) * g + self.beta * self.m if self.nesterov else self.m
        batch = self.w.reshape(-1, *self.w.shape[-2:])
        ub = u.reshape(batch.shape)
        vb = self.v.reshape(batch.shape[:-1])
        for i in range(batch.shape[0]):  # every matrix on its own
            o = ref_polar(ub[i])
            mm, nn_ = o.shape
            vb[i] = self.beta2 * vb[i] + (1 - self.beta2) * np.mean(o * o, axis=1)
            on = o / (np.sqrt(vb[i])[:, None] + 1e-10)
            on = on * np.linalg.norm(o) / (np.linalg.norm(on) + 1e-10)
            batch[i] = batch[i] * (1 - lr * self.wd) - lr * self.scale * math.sqrt(max(mm, nn_)) * on
        self.w = batch.reshape(self.w.shape)
        self.v = vb.reshape(self.v.shape)


class RefAdamW:
    def __init__(self, w: np.ndarray, b1=0.9, b2=0.95, eps=1e-8, wd=0.1):
        self.w = w.astype(np.float64).copy()
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)
        self.t = 0
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd

    def step(self, g: np.ndarray, lr: float) -> None:
        g = g.astype(np.float64)
        self.t += 1
        self.w *= 1 - lr * self.wd
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mhat = self.m / (1 - self.b1**self.t)
        vhat = self.v / (1 - self.b2**self.t)
        self.w -= lr * mhat / (np.sqrt(vhat) + self.eps)
