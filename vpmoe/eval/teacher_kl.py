"""Held-out KL to the teacher: the offline-KD objective measured on a split the student never trained on.

Per span: mean over supervised positions of KL(teacher || student) on the teacher's stored top-K buckets plus
the tail bucket (vpmoe.train.losses.topk_kl at temperature 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpmoe import spans
from vpmoe.data.loader import Loader, read_manifest
from vpmoe.teacher.sidecar import TeacherSidecar, batch_rows
from vpmoe.train import losses


@torch.no_grad()
def heldout_teacher_kl(model, dataset: str | Path, split: str = "valid", batch_size: int = 4,
                       max_samples: int = 0) -> dict:
    sidecar = TeacherSidecar(dataset, split)
    seq_len = read_manifest(dataset)["seq_len"]
    loader = Loader(dataset, split, seq_len, batch_size, seed=0, shuffle=False)
    total = len(sidecar) if not max_samples else min(max_samples, len(sidecar))
    device = next(model.parameters()).device
    sums = torch.zeros(spans.COUNT, dtype=torch.float64)
    counts = torch.zeros(spans.COUNT, dtype=torch.int64)
    for start in range(0, total, batch_size):
        batch = next(loader).to(device)
        keep = min(batch_size, total - start)
        mask = batch.label_spans[:keep] > 0
        out = model(batch.input_ids[:keep], batch.position_ids[:keep], batch.doc_ids[:keep], logits_at=mask)
        teacher = batch_rows(sidecar, batch.sample_index[:keep].tolist(), device)
        kl = losses.topk_kl(out.logits, teacher.topk_ids, teacher.topk_logprobs)
        labels = batch.label_spans[:keep][mask]
        sums += losses.span_sums(kl.double(), labels).cpu()
        counts += losses.span_counts(labels).cpu()
    result = {name: {"kl": (sums[s] / max(counts[s], 1)).item(), "tokens": int(counts[s])}
              for s, name in spans.SUPERVISED.items()}
    result["all"] = {"kl": (sums[1:].sum() / max(int(counts[1:].sum()), 1)).item(), "tokens": int(counts[1:].sum())}
    return result
