"""The eval config (`configs/eval/*.toml`): which checkpoints, which dataset, which parts, decoding settings.

    [eval]
    checkpoint = "runs/tiny_ce"        # one path, or a list of paths: several are compared (table + PNG)
    steps = "latest"                   # for a run directory: "latest" complete checkpoint, or "all" of them
    dataset = "data/datasets/demo"     # a built dataset; "" skips held-out loss
    parts = ["heldout", "suite", "sanity"]

A path is a run directory, a training checkpoint `<run>/checkpoints/step_NNNNNNN/`, or a checkpoint object /
export directory (`config.json` + safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vpmoe import config as config_io
from vpmoe.provenance import portable_name

PARTS = ("heldout", "suite", "sanity", "teacher_kl")  # teacher_kl needs a dataset with a teacher sidecar
DEFAULT_PARTS = ("heldout", "suite", "sanity")


@dataclass
class EvalSection:
    checkpoint: str | list[str] = ""  # one checkpoint path, or a list of them (compared side by side)
    steps: Literal["latest", "all"] = "latest"  # which checkpoints of a run directory are evaluated
    dataset: str = ""  # a built dataset directory for held-out loss; "" skips it
    split: str = "valid"
    max_samples: int = 256  # held-out samples (the first ones of the split, in order); 0 = all
    batch_size: int = 8  # rows per forward (held-out) and prompts per generation batch (suite)
    max_new_tokens: int = 512  # generation budget per suite prompt (greedy), analysis + final
    reasoning_effort: Literal["low", "medium", "high"] = "medium"  # in the system message of suite prompts (the
    # data-build default; match the effort the model was trained with)
    suite: str = ""  # a suite JSONL; "" = the pinned suite shipped in the package
    suite_items: int = 0  # 0 = every item; else that many, round-robin over categories (quick CPU runs)
    parts: list[str] = field(default_factory=lambda: list(DEFAULT_PARTS))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    kernels: Literal["reference", "fast"] = "reference"  # fast: FlexAttention + grouped GEMM (CUDA, bf16)
    reuse: bool = True  # keep an existing report of a checkpoint made with the same settings instead of re-running
    out: str = ""  # where a comparison (several checkpoints) writes compare.{md,json,png}; "" = the run's eval/

    def validate(self) -> None:
        paths = self.checkpoints()
        if not paths or any(not p for p in paths):
            raise ValueError("'eval.checkpoint' is empty: give a checkpoint path (or a list of them)")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"'eval.parts' must be a non-empty subset of {list(PARTS)}, got {self.parts}")
        if self.max_samples < 0 or self.suite_items < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.max_samples and eval.suite_items must be >= 0, eval.batch_size and "
                             "eval.max_new_tokens >= 1")

    def checkpoints(self) -> list[str]:
        return [self.checkpoint] if isinstance(self.checkpoint, str) else list(self.checkpoint)

    def settings(self) -> dict:
        """What decides a report's numbers for a given checkpoint (its hash decides whether a report is reused).
        Paths are portable names (no machine paths in reports); the runner adds content hashes."""
        keep = ("split", "max_samples", "max_new_tokens", "reasoning_effort", "suite_items", "parts", "precision")
        return {"dataset": portable_name(self.dataset) if self.dataset else "",
                "suite": portable_name(self.suite) if self.suite else "",
                **{k: getattr(self, k) for k in keep}}


@dataclass
class EvalConfig:
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> None:
        self.eval.validate()


def load_eval_config(path: str | None, overrides: list[str] | None = None, changes: dict | None = None) -> EvalConfig:
    """An eval config file (or, with `path` None, the defaults) with the user's overrides and typed changes."""
    if path is None:
        return config_io.from_overrides(EvalConfig, overrides or [], changes)
    return config_io.load(path, EvalConfig, overrides, kind="eval", changes=changes)
