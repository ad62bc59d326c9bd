"""[opd] of a train config: on-policy distillation (train.stage = "opd", vpmoe/train/objectives/opd.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OpdSection:
    samples_per_prompt: int = 4  # G completions per prompt; a micro-batch is data.micro_batch_size prompts x G
    # rows per training (and teacher) forward: the sampler completes a whole micro-batch at once, training goes
    # through it this many rows at a time (activations scale with rows x length); 0: all of them at once
    train_rows: int = 0
    # exact: the per-token reverse KL over the whole vocabulary; sampled: the sampled-token estimator (advantage
    # -(log p_sampler - log p_teacher), importance ratio clipped to [1 - clip_low, 1 + clip_high], discount 0)
    loss: Literal["exact", "sampled"] = "exact"
    forward_kl: float = 0.0  # weight of KL(teacher || student) added on the same tokens (guards long rollouts)
    clip_low: float = 0.2
    clip_high: float = 0.28
    temperature: float = 1.0  # sampling; the losses are at temperature 1 (the sampled estimate is off-policy at != 1)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512  # the sampler's capacity; the curriculum sets each step's limit within it
    # "same": the student's prompt has the teacher's (the curriculum's) effort; an effort: the student's prompt always
    # has it while the teacher's follows the curriculum (asymmetric, an experiment: watch the lengths)
    student_effort: Literal["same", "low", "medium", "high"] = "same"
    # the sampler's decode step (vpmoe.model.sample): "graph" and "compile" need CUDA
    sampler: Literal["eager", "graph", "compile"] = "eager"
    chunk_tokens: int = 512  # tokens per chunk of the head losses (bounds the [chunk x vocab] fp32 buffers)
    topk: int = 8  # k of the teacher top-k mass / overlap statistics
    ngram: int = 4  # n of the repetition rate
    rollouts_every: int = 50  # steps between rollout dumps to <run>/rollouts.jsonl; 0: never
    rollouts_logged: int = 4  # rollouts per dump

    def validate(self) -> None:
        if min(self.samples_per_prompt, self.max_new_tokens, self.chunk_tokens, self.ngram) < 1:
            raise ValueError("opd.samples_per_prompt, opd.max_new_tokens, opd.chunk_tokens and opd.ngram must be >= 1")
        if self.forward_kl < 0 or not 0 <= self.clip_low < 1 or self.clip_high < 0:
            raise ValueError("opd.forward_kl >= 0, 0 <= opd.clip_low < 1 and opd.clip_high >= 0 expected")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.topk < 1:
            raise ValueError("opd.temperature > 0, 0 < opd.top_p <= 1, opd.top_k >= 0 and opd.topk >= 1 expected")
        if min(self.rollouts_every, self.rollouts_logged, self.train_rows) < 0:
            raise ValueError("opd.rollouts_every, opd.rollouts_logged and opd.train_rows must be >= 0")
