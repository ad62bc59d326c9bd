"""Stage `kd_offline`: CE plus the KL to the teacher's stored top-K (tail bucket, T^2), optionally CE weighted by
the teacher's confidence in the actual token. The teacher is the dataset's sidecar (`vpmoe teacher score`)."""

from __future__ import annotations

import torch

from vpmoe.distributed import Ranks, all_reduce_sum
from vpmoe.errors import UserError
from vpmoe.teacher.sidecar import TeacherSidecar, batch_rows
from vpmoe.train import losses
from vpmoe.train.config import TrainConfig
from vpmoe.train.objectives.base import TrainBatch
from vpmoe.train.objectives.ce import CrossEntropy


class OfflineKD(CrossEntropy):
    name = "kd_offline"

    def __init__(self, cfg: TrainConfig, ranks: Ranks):
        super().__init__(cfg, ranks)
        if not cfg.data.path:
            raise UserError("train.stage = \"kd_offline\" reads the teacher sidecar of data.path")
        self.sidecar = TeacherSidecar(cfg.data.path, "train")
        self.confidence_mean: float | None = None  # EMA of the batch-mean teacher log-prob of the actual tokens

    def batches(self, data, count: int) -> list[TrainBatch]:
        device = self.ranks.device
        batches = []
        for _ in range(count):
            rows = next(data).to(device)
            batches.append(TrainBatch(rows, batch_rows(self.sidecar, rows.sample_index.tolist(), device)))
        if self.cfg.loss.confidence_ce > 0:
            self.update_confidence_mean(batches)
        return batches

    def terms(self, logits, ce, spans, batch: TrainBatch, counts):
        loss = self.cfg.loss
        terms, sums = super().terms(logits, ce, spans, batch, counts)
        teacher = batch.teacher
        if loss.kd > 0:
            kd = losses.topk_kl(logits, teacher.topk_ids, teacher.topk_logprobs, loss.temperature)
            terms["kd"] = loss.kd * self.normalized(kd, spans, counts)
            sums["kd"] = losses.span_sums(kd.detach(), spans)
        if loss.confidence_ce > 0:
            weights = losses.confidence_weights(teacher.target_logprob, self.confidence_mean, loss.temperature)
            terms["confidence_ce"] = loss.confidence_ce * self.normalized(weights * ce, spans, counts)
        return terms, sums

    def update_confidence_mean(self, batches: list[TrainBatch]) -> None:
        """EMA of the global batch's mean teacher log-prob of the actual tokens (exact across resume)."""
        values = [b.teacher.target_logprob for b in batches]
        total = torch.stack([sum(v.sum() for v in values),
                             torch.tensor(float(sum(len(v) for v in values)), device=self.ranks.device)]).double()
        total = all_reduce_sum(total, self.ranks)
        batch_mean = (total[0] / total[1].clamp(min=1)).item()
        m = self.cfg.loss.confidence_momentum
        self.confidence_mean = batch_mean if self.confidence_mean is None else \
            m * self.confidence_mean + (1 - m) * batch_mean

    def state_dict(self) -> dict:
        return {"confidence_mean": self.confidence_mean}

    def load_state_dict(self, state: dict) -> None:
        self.confidence_mean = state["confidence_mean"]

    def provenance(self) -> list[dict]:
        return [{"teacher": self.sidecar.section.get("provenance", {})}]
