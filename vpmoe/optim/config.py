"""Optimizer configuration (a plain-value section, loadable by vpmoe.config as e.g. `[optim]`)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class OptimConfig:
    """Hyperparameters of the two optimizer families and the shared schedule.

    NorMuon (2-D hidden matrices, 3-D expert banks):
      lr_matrix        peak learning rate. The update is scaled to RMS ~= `update_scale` (Moonlight convention,
                       see vpmoe/optim/normuon.py), so AdamW-style values (1e-4 .. 3e-3) transfer.
      weight_decay     decoupled: p <- p * (1 - lr * weight_decay).
      momentum         EMA momentum coefficient (m <- momentum * m + (1 - momentum) * g).
      nesterov         orthogonalize (1 - momentum) * g + momentum * m instead of m.
      beta2            EMA coefficient of the per-row second moment of the orthogonalized update.
      ns_steps         Polar Express iterations (the coefficient table has 5).
      update_scale     0.2: update = update_scale * sqrt(max(m, n)) * normalized orthogonal update.
      ortho_dtype      "auto" (bfloat16 on CUDA, float32 elsewhere), "bfloat16" or "float32".
      compile          "off" (default) or "on": torch.compile the elementwise steps of large tensors into single
                       kernels (momentum + Nesterov + cast; decay + row-scaled update). A compilation
                       that fails ends the run (set "off"). On H200 / torch 2.11 it cut the full vpMoE step's GPU time from ~197
                       to ~158 ms but the step's wall time rose to ~370-390 ms (CPU-bound dynamo overhead), hence off.
    AdamW (embeddings, head, router: decayed; norms, biases, sinks, value-residual logits, GRAPE frequencies: not):
      lr_adam, adam_beta1, adam_beta2, adam_eps, adam_weight_decay.
    Schedule (both families, each from its own peak LR):
      warmup_steps     linear warmup from lr/warmup_steps to the peak.
      decay_steps      cosine decay ends here (0: the run's total steps); afterwards the LR stays at the floor.
      min_lr_ratio     floor = min_lr_ratio * peak.
    """

    lr_matrix: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    beta2: float = 0.95
    ns_steps: int = 5
    update_scale: float = 0.2
    ortho_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    compile: Literal["off", "on"] = "off"
    lr_adam: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.1
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.1

    def validate(self) -> None:
        for key in ("lr_matrix", "lr_adam", "weight_decay", "adam_weight_decay", "adam_eps", "update_scale"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("momentum", "beta2", "adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"optim.{key} must be in [0, 1), got {v}")
        if not 1 <= self.ns_steps <= 5:
            raise ValueError(f"optim.ns_steps must be in 1..5 (the Polar Express table has 5), got {self.ns_steps}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.compile not in ("on", "off"):
            raise ValueError(f"optim.compile must be on or off, got {self.compile!r}")
        if self.ortho_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"optim.ortho_dtype must be auto, bfloat16 or float32, got {self.ortho_dtype!r}")
