"""The training config: one stage of training, loaded from `configs/train/*.toml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vpmoe import config as config_io
from vpmoe.model.naming import FREEZE_GROUPS
from vpmoe.optim.config import OptimConfig
from vpmoe.teacher.online import OnlineTeacherSection
from vpmoe.train.curriculum import CurriculumSection
from vpmoe.train.opd_config import OpdSection

ONLINE_TEACHER_STAGES = ("kd_online", "opd")  # stages with a teacher in the loop


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
    # kd_online and opd run a teacher in the loop: they need a [teacher] section (vpmoe/teacher/online.py)
    stage: Literal["ce", "kd_offline", "kd_online", "opd"] = "ce"
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
class DistillSection:
    """[distill] of stage kd_online: CE + full-vocabulary KL + hidden-state cosine (train/objectives/kd_online.py).
    Every term is span-normalized over the global batch and weighted as given (the weights are not renormalized)."""

    ce: float = 0.25  # cross-entropy on the dataset's tokens (at T = 1)
    kl: float = 0.5  # T^2 * KL(teacher || student) over the whole vocabulary, both at `temperature`
    hidden: float = 0.25  # mean over layer pairs of 1 - cos(W h_student, h_teacher)
    temperature: float = 1.0
    # positions per chunk of the head losses (a few [chunk, vocab] fp32 buffers live). 256 keeps the loss side under
    # 2 GiB at 8,192 tokens per micro-batch (H200: 1.84 GiB; 512: 2.51 GiB, ~10% faster)
    kl_chunk_tokens: int = 256
    # "auto": 5 student blocks at even fractional depths (the last one included) mapped to the teacher's
    # round((i + 1) * L_t / L_s) - 1; or [[student_block, teacher_block], ...], 0-based block outputs
    layer_pairs: str | list[list[int]] = "auto"
    hidden_weight_schedule: Literal["constant", "linear"] = "constant"
    hidden_final: float | None = None  # linear: the hidden weight at the last step (train.steps)
    standardize: bool = False  # standardize the teacher states per dimension by running statistics
    projection_lr: float = 5e-3  # AdamW peak LR of the projections (their own group, the model's schedule)
    projection_weight_decay: float = 0.0

    def validate(self) -> None:
        for key in ("ce", "kl", "hidden", "projection_weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"distill.{key} must be >= 0, got {getattr(self, key)}")
        if self.ce + self.kl + self.hidden == 0:
            raise ValueError("distill.ce, distill.kl and distill.hidden are all 0: nothing to train on")
        if self.temperature <= 0 or self.projection_lr <= 0 or self.kl_chunk_tokens < 1:
            raise ValueError("distill.temperature and distill.projection_lr must be positive, "
                             "distill.kl_chunk_tokens at least 1")
        if isinstance(self.layer_pairs, str) and self.layer_pairs != "auto":
            raise ValueError(f'distill.layer_pairs must be "auto" or a list of [student_layer, teacher_layer], '
                             f"got {self.layer_pairs!r}")
        if (self.hidden_weight_schedule == "linear") != (self.hidden_final is not None):
            raise ValueError('distill.hidden_final goes with distill.hidden_weight_schedule = "linear" (the weight '
                             'at the last step), and only with it')
        if self.hidden_final is not None and self.hidden_final < 0:
            raise ValueError(f"distill.hidden_final must be >= 0, got {self.hidden_final}")

    def hidden_weight(self, step: int, steps: int) -> float:
        """The hidden term's weight at optimizer step `step` (0-based) of `steps`."""
        if self.hidden_weight_schedule == "constant":
            return self.hidden
        return self.hidden + (self.hidden_final - self.hidden) * step / max(steps - 1, 1)


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
class ParallelSection:
    """How the ranks of a `torchrun` job are laid out (vpmoe.train.mesh): dp_replicate x dp_shard x ep = world size."""

    dp_shard: int = 0  # FSDP2 shards over these ranks; 0: the world size / (dp_replicate * ep)
    ep: int = 1  # expert parallel: each MoE layer's routed experts are split over this many ranks
    dp_replicate: int = 1  # HSDP: replicas of the sharded model (gradients all-reduced between them)

    def validate(self) -> None:
        if self.dp_shard < 0 or self.ep < 1 or self.dp_replicate < 1:
            raise ValueError("parallel.ep and parallel.dp_replicate must be at least 1, parallel.dp_shard at least 0 "
                             "(0: what the world size leaves)")


@dataclass
class TrainConfig:
    run: RunSection
    model: ModelRef
    data: DataRef
    train: TrainSection
    checkpoint: CheckpointSection
    opd: OpdSection | None = None  # stage opd (defaults when left out)
    curriculum: CurriculumSection | None = None  # stage opd: efforts and lengths per step (defaults when left out)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)
    health: HealthSection = field(default_factory=HealthSection)
    teacher: OnlineTeacherSection | None = None  # the in-the-loop teacher of kd_online / opd
    distill: DistillSection | None = None  # kd_online's loss mix (defaults when left out)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @property
    def distill_section(self) -> DistillSection:
        return self.distill or DistillSection()

    @property
    def opd_section(self) -> OpdSection:
        return self.opd or OpdSection()

    @property
    def curriculum_section(self) -> CurriculumSection:
        return self.curriculum or CurriculumSection()

    def validate(self) -> None:
        online = self.train.stage in ONLINE_TEACHER_STAGES
        if online and self.teacher is None:
            raise ValueError(f"train.stage = \"{self.train.stage}\" runs a teacher in the loop: add a [teacher] "
                             f"section with its path")
        if self.teacher is not None and not online:
            raise ValueError(f"[teacher] is for the stages with a teacher in the loop {list(ONLINE_TEACHER_STAGES)}, "
                             f"not train.stage = \"{self.train.stage}\"")
        for section, stage in (("distill", "kd_online"), ("opd", "opd"), ("curriculum", "opd")):
            if getattr(self, section) is not None and self.train.stage != stage:
                raise ValueError(f"[{section}] is for train.stage = \"{stage}\", not \"{self.train.stage}\"")
        if self.train.stage == "kd_online" and self.train.compile == "cudagraphs":
            raise ValueError('train.stage = "kd_online" reads block outputs with hooks, which CUDA-graph replays '
                             'overwrite: use train.compile = "on"')
        if online:
            defaults = LossSection()
            moved = [k for k in ("ce", "temperature") if getattr(self.loss, k) != getattr(defaults, k)]
            if moved:
                where = (f"set distill.{moved[0]} instead" if self.train.stage == "kd_online"
                         else "its loss is set in [opd]")
                raise ValueError(f"loss.{moved[0]} does not apply to train.stage = \"{self.train.stage}\": {where} "
                                 f"(loss.span_weights still applies)")
        needs_teacher = self.loss.kd > 0 or self.loss.confidence_ce > 0
        if needs_teacher and self.train.stage != "kd_offline":
            raise ValueError("loss.kd and loss.confidence_ce need a teacher: set train.stage = \"kd_offline\"")
        if self.train.stage == "kd_offline" and not needs_teacher:
            raise ValueError("train.stage = \"kd_offline\" needs loss.kd > 0 or loss.confidence_ce > 0")
        if self.train.compile == "cudagraphs" and self.train.activation_checkpointing:
            raise ValueError("train.compile = \"cudagraphs\" does not combine with train.activation_checkpointing "
                             "(a recomputed block would replay its graph inside the backward): use compile = \"on\"")
        if self.train.stage == "opd":
            lengths, capacity = self.curriculum_section.max_new_tokens, self.opd_section.max_new_tokens
            if lengths and max(lengths) > capacity:
                raise ValueError(f"curriculum.max_new_tokens reaches {max(lengths)}, above opd.max_new_tokens "
                                 f"({capacity}, the sampler's capacity)")
            if self.train.compile == "cudagraphs":
                raise ValueError("train.stage = \"opd\" trains on rows of varying length: use train.compile = "
                                 "\"on\" or \"off\" (opd.sampler = \"graph\" captures the decode step)")


def load_train_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    return config_io.load(path, TrainConfig, overrides, kind="train")
