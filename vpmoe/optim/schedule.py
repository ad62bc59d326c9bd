"""Learning-rate schedule shared by both optimizer families: linear warmup, cosine decay to a floor.

The schedule is a multiplier on each param group's peak LR (`initial_lr`), applied through
torch.optim.lr_scheduler.LambdaLR so that its position is part of `scheduler.state_dict()`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vpmoe.optim.config import OptimConfig


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """multiplier(step) for step = number of optimizer steps already taken (0 for the first step).

    step < warmup:              (step + 1) / warmup
    warmup <= step < total:     floor + (1 - floor) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
    step >= total:              floor
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        if span <= 0:
            return 1.0 if step < self.total_steps else self.min_lr_ratio
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group (both families) with WarmupCosine; call `.step()` after each optimizer step.

    The decay ends at cfg.decay_steps, or at total_steps when cfg.decay_steps is 0.
    """
    end = cfg.decay_steps or total_steps
    if end < cfg.warmup_steps:
        raise ValueError(f"schedule: decay end {end} is before the end of warmup {cfg.warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, end, cfg.min_lr_ratio))
