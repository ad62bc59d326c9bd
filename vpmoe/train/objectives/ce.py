"""Stage `ce`: span-normalized cross-entropy on the dataset's supervised tokens."""

from __future__ import annotations

import torch

from vpmoe.distributed import Ranks
from vpmoe.train import losses
from vpmoe.train.config import TrainConfig
from vpmoe.train.objectives.base import LossOutput, Objective, TrainBatch


class CrossEntropy(Objective):
    name = "ce"

    def __init__(self, cfg: TrainConfig, ranks: Ranks):
        self.cfg, self.ranks = cfg, ranks
        self.span_weights = torch.tensor([0.0, *cfg.loss.span_weights], device=ranks.device)

    def batches(self, data, count: int) -> list[TrainBatch]:
        return [TrainBatch(next(data).to(self.ranks.device)) for _ in range(count)]

    def loss(self, model, batch: TrainBatch, counts: torch.Tensor) -> LossOutput:
        rows = batch.rows
        mask = rows.label_spans > 0
        out = model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=mask)
        spans = rows.label_spans[mask]
        ce = losses.cross_entropy(out.logits, rows.labels[mask])
        terms, sums = self.terms(out.logits, ce, spans, batch, counts)
        return LossOutput(sum(terms.values()), terms, sums, out.aux_loss, out.routing_counts)

    def terms(self, logits: torch.Tensor, ce: torch.Tensor, spans: torch.Tensor, batch: TrainBatch,
              counts: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weighted loss terms and the per-span sums to log (subclasses add theirs)."""
        terms = {}
        if self.cfg.loss.ce > 0:
            terms["ce"] = self.cfg.loss.ce * self.normalized(ce, spans, counts)
        return terms, {"ce": losses.span_sums(ce.detach(), spans)}

    def normalized(self, values: torch.Tensor, spans: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return losses.span_normalized(values, spans, counts, self.span_weights)
