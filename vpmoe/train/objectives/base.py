"""The interface between the training loop and a stage: an objective knows its batches and its loss; the loop
(accumulation, clipping, optimizer, schedule, expert-bias updates, metrics, health, checkpoints) knows none of the
stages by name.

Per optimizer step the loop calls `objective.batches(data, grad_accum)` once, sums the span counts of those
micro-batches over the whole global batch (all micro-batches and ranks), then per micro-batch calls
`objective.loss(model, batch, counts)` under autocast and backpropagates `LossOutput.loss`. A loss term is
span-normalized by those global counts (vpmoe.train.losses.span_normalized), so the per-micro-batch terms add up to
the global-batch loss exactly; the loop multiplies by the world size (FSDP2 averages gradients over ranks) and adds
the MoE aux loss. Extra trainable modules (e.g. hidden-state projections) are optimized with the model and saved in
the training checkpoint with `state_dict`, never exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpmoe.data.loader import Batch
from vpmoe.teacher.online import TeacherStates
from vpmoe.teacher.sidecar import TeacherRows


@dataclass
class TrainBatch:
    """One micro-batch as an objective trains on it: the token rows and what the stage attached to them."""

    rows: Batch
    teacher: TeacherRows | None = None  # the teacher's top-K at the supervised positions (offline KD)
    teacher_states: TeacherStates | None = None  # the in-loop teacher's states there (online KD), on its device

    def to(self, device) -> TrainBatch:
        return TrainBatch(self.rows.to(device), self.teacher.to(device) if self.teacher is not None else None,
                          self.teacher_states)


@dataclass
class LossOutput:
    loss: torch.Tensor  # this micro-batch's share of the global-batch loss, before the world-size factor
    terms: dict[str, torch.Tensor]  # the weighted terms that sum to `loss`, by name (a KL term's name says kl)
    span_sums: dict[str, torch.Tensor]  # per-token values summed per span class [spans.COUNT], for per-span metrics
    aux_loss: torch.Tensor | None = None  # the model's MoE aux loss (unscaled), added by the loop
    routing: torch.Tensor | None = None  # [n_moe_layers, E] tokens routed per expert in this forward


class Objective:
    """A training stage's loss. Subclasses set `name` and implement `loss`; the rest has working defaults."""

    name = ""

    def attach(self, model: torch.nn.Module) -> None:
        """Called once with the prepared student before the first step (a stage that samples from it keeps it)."""

    def batches(self, data, count: int) -> list[TrainBatch]:
        """The step's `count` micro-batches (on the model's device), with whatever the stage needs attached."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: TrainBatch, counts: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        """The stage's own trainable modules, by name, on the model's device. The loop keeps them replicated on
        every rank (their gradients are averaged over ranks), clips them with the model and saves them in the
        training checkpoint; they are never part of the exported model."""
        return {}

    def optimizer_groups(self) -> list[dict]:
        """AdamW groups for the parameters of `modules()`: dicts with `group`, `params`, `lr`, `weight_decay`."""
        return []

    def state_dict(self) -> dict:
        """Extra state to resume exactly (saved per rank in the training checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"objective {self.name!r} keeps no state, got {sorted(state)}")

    def metrics(self) -> dict:
        """Stage-specific metrics since the last call (teacher time, chunk counts, ...)."""
        return {}

    def provenance(self) -> list[dict]:
        """Parent records the run's provenance names (e.g. the teacher)."""
        return []
