"""Teacher-scoring configuration (`vpmoe teacher score CONFIG`).

[teacher]  what is scored, by which model:
  path                    local Hugging Face model directory (config.json + weights); never fetched.
  dataset                 the built dataset directory to score (its sidecars land inside it).
  k                       top-K entries stored per supervised position.
  dtype                   the teacher's compute dtype ("bfloat16" for GPT-OSS-120B; "float32" for tiny CPU runs).
  splits                  the dataset splits to score.
  attn_implementation     passed to `from_pretrained` when set ("eager", "flex_attention", ...).
  experts_implementation  passed to `from_pretrained` when set ("eager", "grouped_mm", ...).

[score]  how the work is run (none of this changes the values written, except `batch_tokens`, which sets how
documents are grouped and so the kernel shapes on a GPU):
  device         "cuda" (rank r of torchrun uses GPU LOCAL_RANK * gpus_per_rank) or "cpu".
  device_map     "none": the whole teacher on one device; "auto": spread over this rank's `gpus_per_rank` GPUs
                 (Hugging Face `device_map="auto"` limited to those GPUs), for a teacher that does not fit one.
  gpus_per_rank  GPUs each rank owns (1 unless device_map = "auto").
  max_gpu_memory fraction of each owned GPU that `device_map = "auto"` may fill with weights.
  batch_tokens   padded tokens per forward batch (documents of similar length are batched together).
  head_chunk     supervised positions per full-vocabulary log-softmax chunk (memory: head_chunk * 201088 * 4 B
                 per live fp32 buffer).
  shard_samples  dataset samples per resumable shard.
  overwrite      replace an existing sidecar (otherwise scoring a scored dataset is an error).
  progress       show a progress bar (tokens/s, ETA) on rank 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class TeacherSection:
    path: str
    dataset: str
    k: int = 64
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    splits: list[str] = field(default_factory=lambda: ["train", "valid"])
    attn_implementation: str | None = None
    experts_implementation: str | None = None

    def validate(self) -> None:
        if not 1 <= self.k <= 4096:
            raise ValueError(f"'teacher.k' must be in [1, 4096], got {self.k}")
        if not self.splits:
            raise ValueError("'teacher.splits' is empty")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"'teacher.splits' repeats a split: {self.splits}")


@dataclass
class ScoreSection:
    device: Literal["cuda", "cpu"] = "cuda"
    device_map: Literal["none", "auto"] = "none"
    gpus_per_rank: int = 1
    max_gpu_memory: float = 0.85
    batch_tokens: int = 32768
    head_chunk: int = 4096
    shard_samples: int = 256
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.gpus_per_rank < 1:
            raise ValueError(f"'score.gpus_per_rank' must be at least 1, got {self.gpus_per_rank}")
        if self.gpus_per_rank > 1 and self.device_map != "auto":
            raise ValueError("'score.gpus_per_rank' > 1 needs score.device_map = \"auto\"")
        if self.device_map == "auto" and self.device != "cuda":
            raise ValueError("'score.device_map' = \"auto\" spreads the teacher over GPUs: it needs device = \"cuda\"")
        if not 0.0 < self.max_gpu_memory <= 1.0:
            raise ValueError(f"'score.max_gpu_memory' must be in (0, 1], got {self.max_gpu_memory}")
        for name in ("batch_tokens", "head_chunk", "shard_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"'score.{name}' must be at least 1, got {getattr(self, name)}")


@dataclass
class ScoreConfig:
    teacher: TeacherSection
    score: ScoreSection


# Keys of the config that decide the values written; a resumed run must agree on all of them.
PLACEMENT_KEYS = ("device", "device_map", "gpus_per_rank", "max_gpu_memory", "overwrite", "progress")


def value_identity(cfg: ScoreConfig) -> dict:
    """The parts of the config that decide the sidecar's bytes (paths and placement excluded)."""
    teacher = {k: v for k, v in dataclasses.asdict(cfg.teacher).items() if k not in ("path", "dataset")}
    score = {k: v for k, v in dataclasses.asdict(cfg.score).items() if k not in PLACEMENT_KEYS}
    return {"teacher": teacher, "score": score}
