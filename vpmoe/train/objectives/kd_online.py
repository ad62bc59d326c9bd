"""Stage `kd_online`: the phase-1 mix with the teacher in the loop (seed 004, "Arcee mix"), per supervised token

    w_ce * CE + w_kl * T^2 * KL(p_teacher || p_student) + w_hidden(step) * mean over layer pairs of 1 - cos(W h_s, h_t)

with the weights, temperature, chunking, layer pairs and schedule of [distill] (train/config.py), the teacher of
[teacher] (teacher/online.py).

Masks: the loader already shifts: `labels[t]` is token t + 1 and `label_spans[t]` its span, 0 where nothing is
learned (prompts, padding, and the last token of a document, which would predict the next document). Every term is
taken at the positions where `label_spans > 0`, the positions and order of CE, and span-normalized by the global
batch's counts (all micro-batches and ranks), so the terms are global span means.
KL: over the whole vocabulary, in chunks of `kl_chunk_tokens` positions straight from the final hidden states and
both heads (train/head_losses.py, exact gradient, no [tokens x vocab] tensor of the micro-batch), computed inside
the student's forward (`head=`) where FSDP2 has gathered the head. CE is at T = 1 whatever the KL's temperature.
Teacher: one forward per micro-batch in `batches`, outside autocast in its own dtype; its final states and the
paired blocks' outputs at the supervised positions travel in the TrainBatch (memory: (1 + pairs) * N * d_teacher
per micro-batch of the step).
Hidden term: student block outputs are captured by hooks during the forward (the last block's is the final
pre-norm output; the embedding output never pairs) and projected by one trainable Linear(d_s -> d_t) per pair (the
stage's own module: its own AdamW group, saved in the training checkpoint, never exported). The projections are
fit by ridge least squares on the first step's global batch (a no-grad student forward over its micro-batches,
summed over ranks). With `standardize`, the teacher statistics are updated once per step from all of its
micro-batches, summed over ranks, before its losses: they do not depend on how the global batch is split.
"""

from __future__ import annotations

import math

import torch

from vpmoe.distributed import Ranks, all_reduce_sum
from vpmoe.errors import UserError
from vpmoe.model.capture import capture_outputs, decoder_layers
from vpmoe.model.config import load_model_config
from vpmoe.teacher.load import identity
from vpmoe.teacher.online import load_online_teacher
from vpmoe.train import head_losses, losses
from vpmoe.train.config import TrainConfig
from vpmoe.train.hidden_distill import HiddenProjections, layer_pairs
from vpmoe.train.objectives.base import LossOutput, Objective, TrainBatch
from vpmoe.train.timing import PhaseTimer


class OnlineKD(Objective):
    name = "kd_online"

    def __init__(self, cfg: TrainConfig, ranks: Ranks):
        self.cfg, self.ranks = cfg, ranks
        self.distill = cfg.distill_section
        self.span_weights = torch.tensor([0.0, *cfg.loss.span_weights], device=ranks.device)
        student = load_model_config(cfg.model.config).model
        self.teacher = load_online_teacher(cfg.teacher, ranks)
        self.projections: HiddenProjections | None = None
        self.pairs: list[tuple[int, int]] = []
        if max(self.distill.hidden, self.distill.hidden_final or 0.0) > 0:
            try:
                self.pairs = layer_pairs(self.distill.layer_pairs, student.n_layers, self.teacher.n_layers)
            except ValueError as e:
                raise UserError(f"distill.layer_pairs (student {student.n_layers} blocks, teacher "
                                f"{self.teacher.n_layers}): {e}") from None
            self.projections = HiddenProjections(self.pairs, student.hidden_size, self.teacher.hidden_size,
                                                 standardize=self.distill.standardize).to(ranks.device)
        self.step = 0  # optimizer steps begun (one `batches` call each): the hidden weight's schedule
        self.initialized = False  # the projections' least-squares fit is done (saved: a resume does not refit)
        self.first_batches: list[TrainBatch] = []  # the first step's micro-batches, until the fit
        self.hidden_weight = self.distill.hidden_weight(0, cfg.train.steps)
        self.timer = PhaseTimer(ranks.device)
        self.window = {"steps": 0, "kl_chunks": 0, "teacher_states_bytes": 0}

    # ---- batches: the teacher runs here, once per micro-batch -------------------------------------------------

    def batches(self, data, count: int) -> list[TrainBatch]:
        batches = []
        blocks = [t for _, t in self.pairs]
        for _ in range(count):
            rows = next(data).to(self.ranks.device)
            with self.timer.phase("teacher"):
                states = self.teacher.forward(rows.input_ids, rows.position_ids, rows.doc_ids, rows.label_spans > 0,
                                              blocks)
            batches.append(TrainBatch(rows, teacher_states=states))
        held = sum(t.numel() * t.element_size() for b in batches for t in [b.teacher_states.hidden,
                                                                           *b.teacher_states.layers])
        self.window["teacher_states_bytes"] = max(self.window["teacher_states_bytes"], held)
        if self.projections is not None and self.distill.standardize:
            self.projections.update_statistics(
                [torch.cat([b.teacher_states.layers[p] for b in batches]) for p in range(len(self.pairs))],
                reduce=self.reduce)
        if self.projections is not None and not self.initialized:
            self.first_batches = batches
        self.hidden_weight = self.distill.hidden_weight(self.step, self.cfg.train.steps)
        self.step += 1
        self.window["steps"] += 1
        return batches

    def reduce(self, tensor: torch.Tensor) -> None:
        all_reduce_sum(tensor, self.ranks)

    # ---- the loss ----------------------------------------------------------------------------------------------

    def loss(self, model, batch: TrainBatch, counts: torch.Tensor) -> LossOutput:
        rows, states = batch.rows, batch.teacher_states
        if self.projections is not None and not self.initialized:
            self.fit_projections(model)
        mask = rows.label_spans > 0
        spans, targets = rows.label_spans[mask], rows.labels[mask]
        d = self.distill
        teacher = head_losses.TeacherHead(states.hidden, self.teacher.head_weight, self.teacher.head_bias)

        def head(hidden: torch.Tensor, weight: torch.Tensor) -> head_losses.HeadLosses:
            return head_losses.compute(hidden, weight, targets=targets, teacher=teacher, ce=True, forward_kl=True,
                                       temperature=d.temperature, chunk_size=d.kl_chunk_tokens)

        blocks = decoder_layers(model)
        with capture_outputs([blocks[s] for s, _ in self.pairs]) as captured:
            out = model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=mask, head=head)
        self.window["kl_chunks"] += math.ceil(len(targets) / d.kl_chunk_tokens)
        terms: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        self.add_term(terms, sums, "ce", d.ce, out.head_output.ce, spans, counts)
        self.add_term(terms, sums, "kl", d.kl, out.head_output.forward_kl, spans, counts)
        if self.projections is not None:
            cosine = self.projections([h[mask] for h in captured], states.layers)
            self.add_term(terms, sums, "hidden", self.hidden_weight, cosine, spans, counts)
        return LossOutput(sum(terms.values()), terms, sums, out.aux_loss, out.routing_counts)

    def add_term(self, terms: dict, sums: dict, name: str, weight: float, values: torch.Tensor,
                 spans: torch.Tensor, counts: torch.Tensor) -> None:
        """A per-token term: weighted and span-normalized into the loss (when its weight is not 0), and its
        per-span sums for the log (always)."""
        if weight > 0:
            terms[name] = weight * losses.span_normalized(values, spans, counts, self.span_weights)
        sums[name] = losses.span_sums(values.detach().float(), spans)

    @torch.no_grad()
    def fit_projections(self, model) -> None:
        """Least squares on the first step's global batch: the student's paired block outputs (a no-grad forward
        per micro-batch, no head) against the teacher's, at the supervised positions, summed over ranks."""
        blocks = decoder_layers(model)
        student: list[list[torch.Tensor]] = [[] for _ in self.pairs]
        for batch in self.first_batches:
            rows = batch.rows
            mask = rows.label_spans > 0
            with capture_outputs([blocks[s] for s, _ in self.pairs]) as captured:
                model(rows.input_ids, rows.position_ids, rows.doc_ids, logits_at=mask, head=lambda h, w: None)
            for p, h in enumerate(captured):
                student[p].append(h[mask])
        teacher = [torch.cat([b.teacher_states.layers[p] for b in self.first_batches]) for p in range(len(self.pairs))]
        self.projections.fit_least_squares([torch.cat(s) for s in student], teacher, reduce=self.reduce)
        self.initialized = True
        self.first_batches = []

    # ---- the loop's interface ------------------------------------------------------------------------------------

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"hidden_projections": self.projections} if self.projections is not None else {}

    def optimizer_groups(self) -> list[dict]:
        if self.projections is None:
            return []
        return [{"group": "hidden_projections", "params": list(self.projections.parameters()),
                 "lr": self.distill.projection_lr, "weight_decay": self.distill.projection_weight_decay}]

    def state_dict(self) -> dict:
        return {"step": self.step, "initialized": self.initialized}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.initialized = state["step"], state["initialized"]

    def metrics(self) -> dict:
        steps = max(self.window["steps"], 1)
        record = {
            "teacher": {
                "forward_ms": self.timer.read().get("teacher", 0.0) / steps,  # per optimizer step, this rank
                "weights_gib": self.teacher.weight_bytes / 2**30,  # this rank's share
                "states_gib": self.window["teacher_states_bytes"] / 2**30,  # the step's states, largest
            },
            "kl_chunks": self.window["kl_chunks"] / steps,  # per optimizer step, this rank
        }
        if self.projections is not None:
            record["hidden_weight"] = self.hidden_weight
            record["projection_norms"] = {f"{s}->{t}": v for (s, t), v in
                                          zip(self.pairs, self.projections.weight_norms().tolist())}
        self.window = {"steps": 0, "kl_chunks": 0, "teacher_states_bytes": 0}
        return record

    def provenance(self) -> list[dict]:
        return [{"teacher": identity(self.cfg.teacher.path)}]
