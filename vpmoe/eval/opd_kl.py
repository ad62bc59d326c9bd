"""Held-out on-policy reverse KL: what stage opd minimizes, measured on prompts the student never trained on.

The student samples `samples_per_prompt` completions of each prompt of a `prompts` dataset's split (temperature 1,
a fixed seed, the system message of `effort`), the teacher scores the same ids, and the exact per-token
KL(student || teacher) over the whole vocabulary is averaged per span over every sampled token. Different students
sample different completions: this is each student's KL on its own distribution, the quantity OPD lowers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpmoe import spans
from vpmoe.data.harmony import system_tokens
from vpmoe.data.loader import SplitReader, read_manifest
from vpmoe.errors import UserError
from vpmoe.model.sample import Sampler
from vpmoe.teacher.online import OnlineTeacher
from vpmoe.train import head_losses, losses, rollouts


@torch.no_grad()
def heldout_reverse_kl(model, teacher: OnlineTeacher, dataset: str | Path, *, split: str = "valid",
                       effort: str = "medium", samples_per_prompt: int = 2, max_new_tokens: int = 32,
                       max_prompts: int = 0, batch_prompts: int = 8, seed: int = 0) -> dict:
    """{"reasoning"|"final"|"all": {"reverse_kl", "tokens"}, "length_mean", "prompts"} of `model` against
    `teacher` (see the module doc)."""
    manifest = read_manifest(dataset)
    if manifest["format"] != "prompts":
        raise UserError(f"held-out reverse KL samples from prompts: {dataset} is a {manifest['format']!r} dataset")
    reader = SplitReader(dataset, split)
    total = len(reader) if not max_prompts else min(max_prompts, len(reader))
    device = model.head.weight.device
    system = system_tokens(effort)
    g = samples_per_prompt
    sampler = Sampler(model, batch_size=batch_prompts * g, max_prompt_len=int(manifest["seq_len"]),
                      max_new_tokens=max_new_tokens)
    generator = torch.Generator(device).manual_seed(seed)
    sums = torch.zeros(spans.COUNT, dtype=torch.float64)
    counts = torch.zeros(spans.COUNT, dtype=torch.int64)
    lengths = []
    for start in range(0, total, batch_prompts):
        stored = [reader.sample(i)[0].tolist() for i in range(start, min(start + batch_prompts, total))]
        prompts = [system + p for p in stored for _ in range(g)]
        sampled = sampler.sample(prompts, generator=generator)
        completions = [sampled.tokens[r, :n].tolist() for r, n in enumerate(sampled.lengths.tolist())]
        lengths += [len(c) for c in completions]
        batch, select = rollouts.training_rows(prompts, completions)
        batch, select = batch.to(device), select.to(device)
        rollouts.check_alignment(batch.input_ids, select, completions, "student")
        states = teacher.forward(batch.input_ids, batch.position_ids, batch.doc_ids, select)
        scored = head_losses.TeacherHead(states.hidden, teacher.head_weight, teacher.head_bias)
        kl = model(batch.input_ids, batch.position_ids, batch.doc_ids, logits_at=select,
                   head=lambda hidden, weight: head_losses.reverse_kl(hidden, weight, scored)).head_output
        labels = batch.label_spans[select]
        sums += losses.span_sums(kl.double(), labels).cpu()
        counts += losses.span_counts(labels).cpu()
    result = {name: {"reverse_kl": (sums[s] / max(int(counts[s]), 1)).item(), "tokens": int(counts[s])}
              for s, name in spans.SUPERVISED.items()}
    result["all"] = {"reverse_kl": (sums[1:].sum() / max(int(counts[1:].sum()), 1)).item(),
                     "tokens": int(counts[1:].sum())}
    result["length_mean"] = sum(lengths) / max(len(lengths), 1)
    result["prompts"] = total
    return result

