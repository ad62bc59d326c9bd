"""The training config: one stage of training, loaded from `configs/train/*.toml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vpmoe import config as config_io
from vpmoe.model.naming import FREEZE_GROUPS
from vpmoe.optim.config import OptimConfig


@dataclass
class RunSection:
    dir: str  # the run directory: config.toml, provenance.json, metrics.jsonl, checkpoints/
    seed: int = 0
    # Resume this run on another dataset than its checkpoints were trained on (provenance.json records both).
    allow_dataset_change: bool = False


@dataclass
class ModelRef:
    config: str  # a model config, configs/model/<object>.toml
    init_from: str = ""  # a checkpoint object (model.safetensors + config.json) to start from; "" = fresh init


@dataclass
class DataRef:
    path: str  # a dataset directory built by `vpmoe data build`
    # Rows of at most this many tokens. The dataset's manifest owns its sequence length: leave this out to use it;
    # a smaller value is allowed when every sample fits (checked at start), a larger one is an error.
    seq_len: int | None = None
    micro_batch_size: int = 1
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * data-parallel ranks

    def validate(self) -> None:
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be at least 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError("data.seq_len must be at least 1")


@dataclass
class TrainSection:
    steps: int
    stage: Literal["ce", "kd_offline"] = "ce"  # kd_online and opd plug in here later
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # fast: FlexAttention + grouped GEMM (CUDA, bf16); reference: plain math, any device; naive: reference attention
    # and a Python loop over experts (the benchmarks' baseline)
    kernels: Literal["reference", "fast", "naive"] = "reference"
    # torch.compile each transformer block (CUDA; a minute or two of compiling at start): "on", or "cudagraphs" to
    # also replay each block as CUDA graphs (removes kernel-launch overhead; one process per GPU, no checkpointing)
    compile: Literal["off", "on", "cudagraphs"] = "off"
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    freeze: list[str] = field(default_factory=list)  # named groups, see vpmoe.model.naming.FREEZE_GROUPS
    log_every: int = 10

    def validate(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ValueError("train.steps and train.log_every must be at least 1")
        if self.grad_clip < 0:
            raise ValueError("train.grad_clip must be >= 0")
        unknown = [g for g in self.freeze if g not in FREEZE_GROUPS]
        if unknown:
            raise ValueError(f"train.freeze: unknown group {unknown[0]!r}; groups are {list(FREEZE_GROUPS)}")


@dataclass
class LossSection:
    ce: float = 1.0  # span-normalized cross-entropy
    kd: float = 0.0  # top-K KL with a tail bucket against the teacher sidecar (stage kd_offline)
    confidence_ce: float = 0.0  # CE weighted by exp((teacher_logprob - running_mean) / T), clipped to [0.25, 4]
    span_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [reasoning, final]
    temperature: float = 1.0
    confidence_momentum: float = 0.99  # EMA of the batch-mean teacher log-prob

    def validate(self) -> None:
        if len(self.span_weights) != 2 or min(self.span_weights) < 0:
            raise ValueError("loss.span_weights must be two non-negative numbers [reasoning, final]")
        if min(self.ce, self.kd, self.confidence_ce) < 0 or self.ce + self.kd + self.confidence_ce == 0:
            raise ValueError("loss weights must be >= 0 and not all 0")
        if self.temperature <= 0:
            raise ValueError("loss.temperature must be positive")


@dataclass
class CheckpointSection:
    every: int  # steps between checkpoints (the last step is always saved)
    keep: int = 3  # complete checkpoints kept; older ones are deleted

    def validate(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be at least 1")


@dataclass
class LoggingSection:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "vpmoe"
    wandb_mode: Literal["offline", "online"] = "offline"


@dataclass
class HealthSection:
    collapse_check: bool = True  # stop when a MoE layer routes nearly everything to top_k experts
    collapse_min_tokens: int = 4096  # judge a layer only over log intervals with at least this many tokens


@dataclass
class TrainConfig:
    run: RunSection
    model: ModelRef
    data: DataRef
    train: TrainSection
    checkpoint: CheckpointSection
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)
    health: HealthSection = field(default_factory=HealthSection)

    def validate(self) -> None:
        needs_teacher = self.loss.kd > 0 or self.loss.confidence_ce > 0
        if needs_teacher and self.train.stage != "kd_offline":
            raise ValueError("loss.kd and loss.confidence_ce need a teacher: set train.stage = \"kd_offline\"")
        if self.train.stage == "kd_offline" and not needs_teacher:
            raise ValueError("train.stage = \"kd_offline\" needs loss.kd > 0 or loss.confidence_ce > 0")
        if self.train.compile == "cudagraphs" and self.train.activation_checkpointing:
            raise ValueError("train.compile = \"cudagraphs\" does not combine with train.activation_checkpointing "
                             "(a recomputed block would replay its graph inside the backward): use compile = \"on\"")


def load_train_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    return config_io.load(path, TrainConfig, overrides, kind="train")
