"""The model config: the architecture of one checkpoint object, loaded from `configs/model/<object>.toml`.

It says what the model *is* (shapes, mode, router knobs) and is what `config.json` beside saved weights holds.
Which kernels run it (reference or fast GPU paths) is a runtime choice, see `vpmoe.model.kernels.Kernels`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vpmoe import config as config_io


@dataclass
class ModelSection:
    name: str
    mode: Literal["compat", "real"]  # compat: RoPE + full attention everywhere, no biases/sinks/value residual
    vocab_size: int
    hidden_size: int
    n_layers: int
    norm_eps: float = 1e-6
    init_std: float = 0.02  # std of fresh linear weights (output projections are scaled down by depth)

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "n_layers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive")


@dataclass
class AttentionSection:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float = 1e6  # RoPE base (compat) and the initial GRAPE-M frequencies (real)
    # The keys below matter in real mode only.
    window: int = 128  # a local query at i sees keys j with i - window < j <= i
    global_every: int = 4  # layer l is global when (l + 1) % global_every == 0
    tpa_q_rank: int = 4
    tpa_kv_rank: int = 2
    grape_log_freq_scale: float = 16.0  # grape_log_freq stores scale * log(theta)

    def validate(self) -> None:
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError("attention.n_heads must be a positive multiple of attention.n_kv_heads")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError("attention.head_dim must be positive and even (rotary pairs)")
        for key in ("window", "global_every", "tpa_q_rank", "tpa_kv_rank"):
            if getattr(self, key) <= 0:
                raise ValueError(f"attention.{key} must be positive")


@dataclass
class FFNSection:
    dense_width: int  # width of every dense ReLU^2 FFN (layer 0 always, all layers of a dense model)

    def validate(self) -> None:
        if self.dense_width <= 0:
            raise ValueError("ffn.dense_width must be positive")


@dataclass
class MoESection:
    """Megatron-Core knob names where one exists (moe_router_*), shortened."""

    enabled: bool = False
    first_moe_layer: int = 1  # layers before it are dense FFNs
    n_experts: int = 256
    expert_width: int = 128
    shared_width: int = 512
    topk: int = 4
    n_groups: int = 8
    group_topk: int = 4
    scaling_factor: float = 2.5
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 1e-4  # seq_aux_loss coefficient; the trainer applies it

    def validate(self) -> None:
        if not self.enabled:
            return
        if self.n_experts <= 0 or self.n_groups <= 0 or self.n_experts % self.n_groups:
            raise ValueError("moe.n_experts must be a positive multiple of moe.n_groups")
        if not 0 < self.group_topk <= self.n_groups:
            raise ValueError("moe.group_topk must be in 1..moe.n_groups")
        if self.topk <= 0 or self.topk % self.group_topk:
            raise ValueError("moe.topk must be a positive multiple of moe.group_topk (Megatron's group score)")
        if self.topk // self.group_topk > self.n_experts // self.n_groups:
            raise ValueError("moe.topk // moe.group_topk exceeds the experts per group")
        if self.topk > self.group_topk * (self.n_experts // self.n_groups):
            raise ValueError("moe.topk exceeds the experts in the selected groups")
        if self.expert_width <= 0 or self.shared_width <= 0 or self.first_moe_layer < 0:
            raise ValueError("moe.expert_width, moe.shared_width must be positive, moe.first_moe_layer >= 0")


@dataclass
class ModelConfig:
    model: ModelSection
    attention: AttentionSection
    ffn: FFNSection
    moe: MoESection = field(default_factory=MoESection)

    def validate(self) -> None:
        if self.moe.enabled and self.moe.first_moe_layer >= self.model.n_layers:
            raise ValueError("moe.first_moe_layer must be below model.n_layers")

    @property
    def real(self) -> bool:
        return self.model.mode == "real"

    def layer_kind(self, layer: int) -> Literal["full", "local", "global"]:
        """full: compat-mode RoPE attention; local: TPA + window + GRAPE-M; global: GQA + ALiBi (NoPE)."""
        if not self.real:
            return "full"
        return "global" if (layer + 1) % self.attention.global_every == 0 else "local"

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.enabled and layer >= self.moe.first_moe_layer

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.model.n_layers) if self.is_moe_layer(layer)]


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    return config_io.load(path, ModelConfig, overrides, kind="model")


def model_config_from_dict(raw: dict, source: str) -> ModelConfig:
    return config_io.from_dict(raw, ModelConfig, source=source)


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)
