"""Stage `opd`: on-policy distillation. The student samples completions of the dataset's prompts, the teacher scores
exactly those ids, and the student moves toward the teacher on its own distribution.

Per optimizer step (`batches`): the sampling copy of the student (the policy: a plain, unsharded model in the
compute dtype, its weights copied in place from the student first) completes each micro-batch's
data.micro_batch_size prompts opd.samples_per_prompt times, at opd.temperature / top_p / top_k, stopping at
`<|return|>`, `<|call|>` or `<|endoftext|>` (kept and trained on; nothing after it) or at the curriculum's
max_new_tokens; the teacher and the training then go through them opd.train_rows rows at a time. Each prompt
gets the system message of its effort (vpmoe.train.curriculum); the student's prompt has the same effort, or
opd.student_effort (asymmetric). The teacher scores teacher_prompt_ids + completion_ids, the
sampled ids themselves (never decoded and re-encoded), and both sides assert that their scored positions predict
exactly those ids. Micro-batch m of rank r is micro-batch m * world + r of the global step: its prompts, efforts
and sampling generator (seeded by run.seed, the step and that index) are the same on any number of ranks, so the
RNG state a checkpoint needs is the curriculum's position.

Loss (`loss`), over every completion token, span-normalized by the global completion-token counts per span (the
loop's counts; spans from the Harmony structure of the sampled tokens, vpmoe.train.rollouts):
- opd.loss = "exact": the reverse KL(student || teacher) over the whole vocabulary at temperature 1, computed in
  token chunks from the final hidden states and both heads (vpmoe.train.head_losses), gradients through every
  student logit;
- opd.loss = "sampled": the sampled-token estimator (advantage -(log p_sampler - log p_teacher), clipped importance
  ratio, discount 0);
- plus opd.forward_kl * KL(teacher || student) when set.
The exact reverse KL and the sampled estimate log p_sampler - log p_teacher are logged per span and per effort in
both modes, with the rollouts' health (lengths, truncation, <|return|> rate, Harmony parse failures, n-gram
repetition), the student's entropy, the teacher's top-k mass and overlap, and the throughput. Every
opd.rollouts_every steps a few rollouts (prompt, completion, per-token KL) go to <run>/rollouts.jsonl.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpmoe import tokenizer as tk
from vpmoe.artifacts.files import write_text
from vpmoe.data.harmony import system_tokens
from vpmoe.data.loader import Batch, read_manifest
from vpmoe.distributed import Ranks, all_reduce_sum
from vpmoe.errors import UserError
from vpmoe.model import build_model
from vpmoe.model.sample import Sampler
from vpmoe.teacher.load import identity
from vpmoe.teacher.online import OnlineTeacher, load_online_teacher
from vpmoe.train import head_losses, losses, rollouts
from vpmoe.train.config import TrainConfig
from vpmoe.train.curriculum import EFFORTS, Curriculum
from vpmoe.train.objectives.base import LossOutput, Objective, TrainBatch
from vpmoe.train.parallelize import autocast_dtype

ROLLOUTS_FILE = "rollouts.jsonl"


@dataclass
class RolloutBatch(TrainBatch):
    """A micro-batch of rollouts: prompt + completion rows and what scoring them needs."""

    select: torch.Tensor | None = None  # [B, S] bool, the positions that predict completion tokens
    teacher_hidden: torch.Tensor | None = None  # [N, D_t] the teacher's final hidden states at those positions
    sampler_logprobs: torch.Tensor | None = None  # [N] log-prob of each completion token under the sampler
    efforts: torch.Tensor | None = None  # [N] index into EFFORTS of the teacher's effort of each token
    prompts: list[list[int]] | None = None  # the student's prompts (for the rollout dump)
    completions: list[list[int]] | None = None
    row_efforts: list[str] | None = None

    def to(self, device) -> RolloutBatch:
        return self  # built on the model's device


class OnPolicyDistillation(Objective):
    name = "opd"

    def __init__(self, cfg: TrainConfig, ranks: Ranks, teacher: OnlineTeacher | None = None):
        self.cfg, self.ranks, self.opd = cfg, ranks, cfg.opd_section
        manifest = read_manifest(cfg.data.path)
        if manifest["format"] != "prompts":
            raise UserError(f"train.stage = \"opd\" samples from prompts: {cfg.data.path} is a {manifest['format']!r} "
                            f"dataset; build one with data.format = \"prompts\"")
        self.max_prompt_len = int(manifest["seq_len"])  # with any effort's system message (data/harmony.py)
        self.teacher = teacher or load_online_teacher(cfg.teacher, ranks)
        self.curriculum = Curriculum(cfg.curriculum_section, self.opd.max_new_tokens, cfg.run.seed)
        self.systems = {effort: system_tokens(effort) for effort in EFFORTS}
        self.span_weights = torch.tensor([0.0, *cfg.loss.span_weights], device=ranks.device)
        self.student: torch.nn.Module | None = None
        self.policy: torch.nn.Module | None = None
        self.sampler: Sampler | None = None
        self.rollouts_path = Path(cfg.run.dir) / ROLLOUTS_FILE
        self.started = False
        self.window = self.empty_window()

    # ---- the student and its sampling copy -----------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        self.student = model
        device = self.ranks.device
        dtype = autocast_dtype(self.cfg.train, device) or torch.float32
        self.policy = build_model(model.cfg, device=device, dtype=dtype, kernels=model.kernels, init=False)
        self.policy.eval().requires_grad_(False)
        self.sync_policy()
        self.sampler = Sampler(self.policy, batch_size=self.cfg.data.micro_batch_size * self.opd.samples_per_prompt,
                               max_prompt_len=self.max_prompt_len,
                               max_new_tokens=self.opd.max_new_tokens, mode=self.opd.sampler)

    @torch.no_grad()
    def sync_policy(self) -> None:
        """Copy the student's current weights into the policy in place (CUDA graphs keep their addresses)."""
        theirs = self.student.state_dict()
        for name, target in self.policy.state_dict().items():
            source = theirs[name]
            target.copy_(source.full_tensor() if hasattr(source, "full_tensor") else source)

    # ---- rollouts --------------------------------------------------------------------------------------------------

    def batches(self, data, count: int) -> list[TrainBatch]:
        if not self.started:
            self.started = True
            if self.ranks.is_main:
                _truncate_rollouts(self.rollouts_path, self.curriculum.position)
        self.sync_policy()
        world, per_micro = self.ranks.world_size, self.cfg.data.micro_batch_size
        step, phase, efforts = self.curriculum.next(per_micro * count * world)
        self.window["max_new_tokens"] = phase.max_new_tokens
        self.window["shares"] = phase.shares
        out = []
        for m in range(count):
            index = m * world + self.ranks.rank  # this micro-batch's place in the global step
            rows = next(data)
            mine = efforts[index * per_micro:(index + 1) * per_micro]
            out += self.rollout_batches(rows, mine, step, index, phase.max_new_tokens)
        return out

    def rollout_batches(self, rows: Batch, efforts: list[str], step: int, index: int,
                        max_new_tokens: int) -> list[RolloutBatch]:
        """Sample one micro-batch's rollouts and score them: RolloutBatches of at most opd.train_rows rows."""
        opd, device, g = self.opd, self.ranks.device, self.opd.samples_per_prompt
        stored = [rows.input_ids[r, :int((rows.doc_ids[r] == 0).sum())].tolist() for r in range(len(efforts))]
        student_effort = lambda e: e if opd.student_effort == "same" else opd.student_effort  # noqa: E731
        row_efforts = [e for e in efforts for _ in range(g)]
        prompts = [self.systems[student_effort(e)] + p for p, e in zip(stored, efforts) for _ in range(g)]
        teacher_prompts = [self.systems[e] + p for p, e in zip(stored, efforts) for _ in range(g)]

        start = time.perf_counter()
        generator = torch.Generator(device).manual_seed(_seed(self.cfg.run.seed, step, index))
        sampled = self.sampler.sample(prompts, generator=generator, temperature=opd.temperature, top_p=opd.top_p,
                                      top_k=opd.top_k or None, max_new_tokens=max_new_tokens)
        lengths = sampled.lengths.tolist()  # the one synchronization with the host
        completions = [sampled.tokens[r, :n].tolist() for r, n in enumerate(lengths)]
        self.note_rollouts(completions, sampled.stopped.tolist(), time.perf_counter() - start)

        start = time.perf_counter()
        size = opd.train_rows or len(prompts)
        out = []
        for first in range(0, len(prompts), size):
            part = slice(first, first + size)
            out.append(self.scored_rows(prompts[part], teacher_prompts[part], completions[part], row_efforts[part],
                                        sampled.logprobs[part][sampled.mask[part]]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.window["teacher_s"] += time.perf_counter() - start
        return out

    def scored_rows(self, prompts, teacher_prompts, completions, row_efforts, sampler_logprobs) -> RolloutBatch:
        """The training rows of some rollouts and the teacher's states at their completion positions."""
        device = self.ranks.device
        batch, select = rollouts.training_rows(prompts, completions)
        batch, select = batch.to(device), select.to(device)
        rollouts.check_alignment(batch.input_ids, select, completions, "student")
        scored, scored_select = batch, select
        if teacher_prompts != prompts:
            scored, scored_select = rollouts.training_rows(teacher_prompts, completions)
            scored, scored_select = scored.to(device), scored_select.to(device)
            rollouts.check_alignment(scored.input_ids, scored_select, completions, "teacher")
        states = self.teacher.forward(scored.input_ids, scored.position_ids, scored.doc_ids, scored_select)
        effort_ids = torch.tensor([EFFORTS.index(e) for e, c in zip(row_efforts, completions) for _ in c],
                                  dtype=torch.long, device=device)
        return RolloutBatch(rows=batch, select=select, teacher_hidden=states.hidden, sampler_logprobs=sampler_logprobs,
                            efforts=effort_ids, prompts=prompts, completions=completions, row_efforts=row_efforts)

    def note_rollouts(self, completions: list[list[int]], stopped: list[bool], seconds: float) -> None:
        w = self.window
        w["sample_s"] += seconds
        w["rollouts"] += len(completions)
        w["stopped"] += sum(stopped)
        w["returned"] += sum(1 for c in completions if c and c[-1] == tk.RETURN)
        w["parse_failures"] += rollouts.parse_failures(completions)
        grams = [max(len(c) - self.opd.ngram + 1, 0) for c in completions]
        w["ngrams"] += sum(grams)
        w["repeated_ngrams"] += rollouts.repetition_rate(completions, self.opd.ngram) * sum(grams)
        for c in completions:
            w["lengths"][len(c)] += 1

    # ---- the loss --------------------------------------------------------------------------------------------------

    def loss(self, model, batch: RolloutBatch, counts: torch.Tensor) -> LossOutput:
        opd, rows, select = self.opd, batch.rows, batch.select
        targets, spans = rows.labels[select], rows.label_spans[select]
        teacher = head_losses.TeacherHead(batch.teacher_hidden, self.teacher.head_weight, self.teacher.head_bias)
        sampled_mode = opd.loss == "sampled"

        def head(hidden: torch.Tensor, weight: torch.Tensor) -> head_losses.HeadLosses:
            return head_losses.compute(hidden, weight, targets=targets, teacher=teacher, ce=sampled_mode,
                                       reverse_kl=True, forward_kl=opd.forward_kl > 0, stats=True, topk=opd.topk,
                                       chunk_size=opd.chunk_tokens)

        out = model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=select, head=head)
        values = out.head_output
        sampled_kl = (batch.sampler_logprobs - values.teacher_logprob).detach()
        terms = {}
        if sampled_mode:
            per_token = head_losses.sampled_token_loss(-values.ce, batch.sampler_logprobs, values.teacher_logprob,
                                                       eps_low=opd.clip_low, eps_high=opd.clip_high)
            terms["sampled_reverse_kl"] = self.normalized(per_token, spans, counts)
        else:
            terms["reverse_kl"] = self.normalized(values.reverse_kl, spans, counts)
        if opd.forward_kl > 0:
            terms["forward_kl"] = opd.forward_kl * self.normalized(values.forward_kl, spans, counts)
        logged = {"reverse_kl": values.reverse_kl, "sampled_kl": sampled_kl, "entropy": values.entropy,
                  "teacher_topk_mass": values.teacher_topk_mass, "topk_overlap": values.topk_overlap}
        if opd.forward_kl > 0:
            logged["forward_kl"] = values.forward_kl
        sums = {key: losses.span_sums(value.detach().float(), spans) for key, value in logged.items()}
        self.note_efforts(batch.efforts, values.reverse_kl.detach(), sampled_kl)
        self.dump_rollouts(batch, values.reverse_kl.detach(), sampled_kl)
        return LossOutput(sum(terms.values()), terms, sums, out.aux_loss, out.routing_counts)

    def normalized(self, values: torch.Tensor, spans: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return losses.span_normalized(values, spans, counts, self.span_weights)

    def note_efforts(self, efforts: torch.Tensor, reverse_kl: torch.Tensor, sampled_kl: torch.Tensor) -> None:
        n = len(EFFORTS)
        per = torch.stack([torch.zeros(n, dtype=torch.float64, device=efforts.device).index_add(0, efforts, v.double())
                           for v in (reverse_kl, sampled_kl, torch.ones_like(reverse_kl))])
        self.window["by_effort"] = self.window["by_effort"] + per

    def dump_rollouts(self, batch: RolloutBatch, reverse_kl: torch.Tensor, sampled_kl: torch.Tensor) -> None:
        """The first rows of the step's first micro-batch on the main rank, every opd.rollouts_every steps."""
        step, every = self.curriculum.position, self.opd.rollouts_every
        if not (self.ranks.is_main and every and step and step % every == 0) or self.window.get("dumped") == step:
            return
        self.window["dumped"] = step
        records = []
        offsets = np.cumsum([0] + [len(c) for c in batch.completions])
        for r in range(min(self.opd.rollouts_logged, len(batch.completions))):
            part = slice(int(offsets[r]), int(offsets[r + 1]))
            records.append({
                "step": step, "effort": batch.row_efforts[r], "prompt": tk.decode(batch.prompts[r]),
                "completion": tk.decode(batch.completions[r]), "completion_ids": batch.completions[r],
                "reverse_kl": [round(v, 5) for v in reverse_kl[part].tolist()],
                "sampled_kl": [round(v, 5) for v in sampled_kl[part].tolist()],
            })
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)

    # ---- metrics, state, provenance -------------------------------------------------------------------------------

    def empty_window(self) -> dict:
        keys = ("sample_s", "teacher_s", "rollouts", "stopped", "returned", "parse_failures", "ngrams",
                "repeated_ngrams")
        window = dict.fromkeys(keys, 0.0)
        window["lengths"] = np.zeros(self.opd.max_new_tokens + 1, dtype=np.int64)
        window["by_effort"] = torch.zeros(3, len(EFFORTS), dtype=torch.float64, device=self.ranks.device)
        return window

    def metrics(self) -> dict:
        """The window's rollout metrics over all ranks (collective)."""
        w, self.window = self.window, self.empty_window()
        device = self.ranks.device
        keys = ("rollouts", "stopped", "returned", "parse_failures", "ngrams", "repeated_ngrams")
        totals = all_reduce_sum(torch.tensor([w[k] for k in keys], dtype=torch.float64, device=device), self.ranks)
        total = dict(zip(keys, totals.tolist()))
        lengths = all_reduce_sum(torch.from_numpy(w["lengths"]).to(device), self.ranks).cpu().numpy()
        by_effort = all_reduce_sum(w["by_effort"], self.ranks).cpu()
        seconds = all_reduce_sum(torch.tensor([w["sample_s"], w["teacher_s"]], dtype=torch.float64, device=device),
                                 self.ranks).div_(self.ranks.world_size).tolist()
        rollouts_n = max(total["rollouts"], 1)
        values = np.repeat(np.arange(len(lengths)), lengths)
        sampled_tokens = float(values.sum())
        efforts = {}
        for i, effort in enumerate(EFFORTS):
            tokens = by_effort[2, i].item()
            if tokens:
                efforts[effort] = {"reverse_kl": by_effort[0, i].item() / tokens,
                                   "sampled_kl": by_effort[1, i].item() / tokens, "tokens": int(tokens)}
        all_tokens = max(by_effort[2].sum().item(), 1)
        return {"opd": {
            "reverse_kl": by_effort[0].sum().item() / all_tokens,
            "sampled_kl": by_effort[1].sum().item() / all_tokens,
            "by_effort": efforts,
            "effort_shares": w.get("shares", {}),
            "max_new_tokens": w.get("max_new_tokens", 0),
            "length": rollouts.length_stats(values.tolist()) if len(values) else {},
            "truncated_fraction": 1 - total["stopped"] / rollouts_n,
            "return_rate": total["returned"] / rollouts_n,
            "parse_failure_rate": total["parse_failures"] / rollouts_n,
            "repetition_rate": total["repeated_ngrams"] / max(total["ngrams"], 1),
            "rollouts_per_s": total["rollouts"] / max(seconds[0], 1e-9),
            "sampled_tokens_per_s": sampled_tokens / max(seconds[0], 1e-9),
            "sample_s": seconds[0], "teacher_s": seconds[1],
        }}

    def state_dict(self) -> dict:
        # The sampling generators are seeded by (run.seed, step, micro-batch): the curriculum's position is the
        # sampler's RNG state as well.
        return {"curriculum": self.curriculum.state_dict(), "sampler_seed": self.cfg.run.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["sampler_seed"] != self.cfg.run.seed:
            raise UserError(f"the checkpoint's sampler seed {state['sampler_seed']} differs from run.seed "
                            f"{self.cfg.run.seed}: a resumed run would sample other rollouts")
        self.curriculum.load_state_dict(state["curriculum"])

    def provenance(self) -> list[dict]:
        teacher = identity(self.cfg.teacher.path) if self.cfg.teacher is not None else {"name": self.teacher.name}
        return [{"teacher": teacher}]


def _seed(seed: int, step: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


def _truncate_rollouts(path: Path, step: int) -> None:
    """Drop rollouts dumped after `step` (a resumed run dumps those steps again) and a line torn by a kill."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # torn
