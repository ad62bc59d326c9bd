"""Drift reports: how far a conversion moved the model's next-token distributions on a fixed calibration batch.

The batch is SYNTH-schema records (vpmoe.data.synthetic, fixed seed) rendered as Harmony conversations with span
labels; one conversation per row. The prediction made at position t is for token t + 1 and belongs to that
token's span (none / reasoning / final). Per span and overall:
- kl_mean, kl_max: KL(source || result) of the next-token distributions, in nats
- top1_agreement: fraction of positions where both argmaxes agree
- max_abs_dlogit: max |source logit - result logit| over positions and vocabulary
- source_nll, result_nll: mean negative log-likelihood of the actual next token
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vpmoe.data import synthetic
from vpmoe.data.harmony import HarmonyRenderer, Reject
from vpmoe.data.loader import SplitReader
from vpmoe.errors import UserError
from vpmoe.spans import NAMES as SPAN_NAMES
from vpmoe.upcycle.config import CalibrationSection

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [S] -> logits [S, V] (any float dtype)
CHUNK = 64  # positions per step of the metric computation (bounds float64 memory at full vocabulary)


@dataclass
class CalibrationRow:
    tokens: np.ndarray  # int32 o200k Harmony ids
    spans: np.ndarray  # uint8 span labels


def calibration_rows(cal: CalibrationSection, records: int | None = None, seed: int | None = None,
                     prefix: str = "calibration") -> list[CalibrationRow]:
    """The fixed calibration batch (or, with another seed/size, the records of the surgery's activation fit)."""
    renderer = HarmonyRenderer(cal.reasoning_effort)
    rows = []
    for record in synthetic.records(records or cal.records, seed=cal.seed if seed is None else seed, prefix=prefix):
        try:
            out = renderer.render(record["query"], record["synthetic_reasoning"], record["synthetic_answer"],
                                  cal.seq_len)
        except Reject as e:
            raise UserError(f"calibration record {record['synth_id']} cannot be rendered in "
                            f"calibration.seq_len = {cal.seq_len} tokens ({e.reason})") from None
        rows.append(CalibrationRow(out.tokens, out.spans))
    return rows


def dataset_rows(dataset: str, start: int, count: int, max_tokens: int, split: str = "train") -> list[CalibrationRow]:
    """Samples start .. start + count - 1 of a split of a dataset built by `vpmoe data build`, each cut to its first
    `max_tokens` tokens (the calibration data of the fits)."""
    reader = SplitReader(dataset, split)
    if start + count > len(reader):
        raise UserError(f"{dataset}: split {split!r} has {len(reader)} samples; {start + count} are needed")
    rows = []
    for i in range(start, start + count):
        tokens, spans = reader.sample(i)
        rows.append(CalibrationRow(np.asarray(tokens[:max_tokens], dtype=np.int32),
                                   np.asarray(spans[:max_tokens], dtype=np.uint8)))
    return rows


class _Accumulator:
    def __init__(self):
        self.n = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.agree = 0
        self.dlogit = 0.0
        self.nll_s = 0.0
        self.nll_r = 0.0

    def add(self, kl, agree, dlogit, nll_s, nll_r) -> None:
        if kl.numel() == 0:
            return
        self.n += kl.numel()
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int(agree.sum())
        self.dlogit = max(self.dlogit, float(dlogit.max()))
        self.nll_s += float(nll_s.sum())
        self.nll_r += float(nll_r.sum())

    def report(self) -> dict:
        if self.n == 0:
            return {"positions": 0}
        return {
            "positions": self.n,
            "kl_mean": self.kl_sum / self.n,
            "kl_max": self.kl_max,
            "top1_agreement": self.agree / self.n,
            "max_abs_dlogit": self.dlogit,
            "source_nll": self.nll_s / self.n,
            "result_nll": self.nll_r / self.n,
        }


@torch.no_grad()
def compare_logits(source: torch.Tensor, result: torch.Tensor, targets: torch.Tensor, spans: torch.Tensor,
                   accumulators: dict[str, _Accumulator]) -> None:
    """source/result logits [N, V] for N predictions of `targets` [N] with span labels `spans` [N]."""
    for start in range(0, source.shape[0], CHUNK):
        s = source[start:start + CHUNK].double()
        r = result[start:start + CHUNK].double()
        t = targets[start:start + CHUNK]
        ls, lr = torch.log_softmax(s, -1), torch.log_softmax(r, -1)
        kl = (ls.exp() * (ls - lr)).sum(-1).clamp_min(0.0)
        agree = s.argmax(-1) == r.argmax(-1)
        dlogit = (s - r).abs().amax(-1)
        nll_s = -ls.gather(1, t[:, None])[:, 0]
        nll_r = -lr.gather(1, t[:, None])[:, 0]
        span = spans[start:start + CHUNK]
        accumulators["all"].add(kl, agree, dlogit, nll_s, nll_r)
        for code, name in SPAN_NAMES.items():
            keep = span == code
            accumulators[name].add(kl[keep], agree[keep], dlogit[keep], nll_s[keep], nll_r[keep])


@torch.no_grad()
def drift_report(source: LogitsFn, result: LogitsFn, rows: list[CalibrationRow]) -> dict:
    """The drift of `result` from `source` on the calibration rows (same token ids for both)."""
    accumulators = {name: _Accumulator() for name in ("all", *SPAN_NAMES.values())}
    for row in rows:
        ids = torch.from_numpy(row.tokens.astype(np.int64))
        ls, lr = source(ids), result(ids)
        if ls.shape != lr.shape:
            raise ValueError(f"source logits {list(ls.shape)} and result logits {list(lr.shape)} differ in shape")
        spans = torch.from_numpy(row.spans.astype(np.int64))
        compare_logits(ls[:-1], lr[:-1], ids[1:], spans[1:], accumulators)
    return {"rows": len(rows), "spans": {name: acc.report() for name, acc in accumulators.items()}}


def vpmoe_logits(model) -> LogitsFn:
    model.eval()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids[None]).logits[0].float()

    return run


def hf_logits(model) -> LogitsFn:
    model.eval()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids[None]).logits[0].float()

    return run


def brief(report: dict) -> dict:
    """The headline numbers of a report (all positions): the result's held-out loss (mean next-token NLL on the
    calibration batch, which no step trains on), the source's, top-1 agreement with the source, KL."""
    a = report["spans"]["all"]
    return {"held_out_loss": a["result_nll"], "source_loss": a["source_nll"], "top1_agreement": a["top1_agreement"],
            "kl_mean": a["kl_mean"]}


def summary(report: dict) -> str:
    a = report["spans"]["all"]
    return (f"KL {a['kl_mean']:.4g} nats, top-1 agreement {a['top1_agreement']:.3f}, "
            f"max |dlogit| {a['max_abs_dlogit']:.3g}")


def _char_spans(row: CalibrationRow) -> tuple[str, np.ndarray]:
    """The row's text and the span label of every character (the label of the o200k token that covers it)."""
    from vpmoe import tokenizer as tk

    ids = row.tokens.tolist()
    text = tk.decode(ids)
    labels = np.zeros(len(text), dtype=np.uint8)
    start = 0
    for i in range(len(ids)):
        end = len(tk.decode(ids[: i + 1]))
        labels[start:end] = row.spans[i]
        start = end
    return text, labels


@torch.no_grad()
def drift_across_tokenizers(source, source_tok, result, result_tok, rows: list[CalibrationRow]) -> dict:
    """Drift of a vocabulary transplant, where source and result tokenize the same text differently.

    Both models read the calibration text with their own tokenizer. Reported per span: bits per byte of each model
    (its next-token NLL summed over the tokens whose first character lies in the span, / ln 2 / the bytes of those
    tokens), and, on aligned positions (both tokenizations end a token at the same character, so both predict the
    next token from the same text), KL / top-1 agreement / max |dlogit| of the distributions restricted to the
    tokens both vocabularies share (matched by token string), with logits taken as log-probabilities over that
    shared set."""
    vs, vr = source_tok.get_vocab(), result_tok.get_vocab()
    shared = sorted(set(vs) & set(vr), key=lambda t: vr[t])
    ids_s = torch.tensor([vs[t] for t in shared])
    ids_r = torch.tensor([vr[t] for t in shared])
    names = ("all", *SPAN_NAMES.values())
    acc = {name: _Accumulator() for name in names}
    bits = {side: {name: [0.0, 0] for name in names} for side in ("source", "result")}
    for row in rows:
        text, labels = _char_spans(row)
        sides = {}
        for side, model, tok in (("source", source, source_tok), ("result", result, result_tok)):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(enc["input_ids"])
            offsets = enc["offset_mapping"]
            logits = model(input_ids=ids[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            nll = -logp[:-1].gather(1, ids[1:, None])[:, 0]
            for t in range(1, len(ids)):
                start, end = offsets[t]
                span = SPAN_NAMES[int(labels[start])] if start < len(labels) else "none"
                nbytes = len(text[start:end].encode("utf-8"))
                for name in ("all", span):
                    bits[side][name][0] += float(nll[t - 1])
                    bits[side][name][1] += nbytes
            ends = {offsets[t][1]: t for t in range(len(ids) - 1)}
            sides[side] = (logits, ends, offsets)
        logits_s, ends_s, _ = sides["source"]
        logits_r, ends_r, offsets_r = sides["result"]
        common = sorted(set(ends_s) & set(ends_r))
        if not common:
            continue
        ts, tr = [ends_s[c] for c in common], [ends_r[c] for c in common]
        s = torch.log_softmax(logits_s[ts][:, ids_s], -1)
        r = torch.log_softmax(logits_r[tr][:, ids_r], -1)
        kl = (s.exp() * (s - r)).sum(-1).clamp_min(0.0)
        agree = s.argmax(-1) == r.argmax(-1)
        dlogit = (s - r).abs().amax(-1)
        zeros = torch.zeros_like(kl)
        span_of = torch.tensor([int(labels[c]) if c < len(labels) else 0 for c in common])
        acc["all"].add(kl, agree, dlogit, zeros, zeros)
        for code, name in SPAN_NAMES.items():
            keep = span_of == code
            acc[name].add(kl[keep], agree[keep], dlogit[keep], zeros[keep], zeros[keep])
    report = {"rows": len(rows), "shared_vocabulary": len(shared), "spans": {}}
    for name in names:
        entry = acc[name].report()
        entry.pop("source_nll", None), entry.pop("result_nll", None)
        entry["aligned_positions"] = entry.pop("positions")
        for side in ("source", "result"):
            total, nbytes = bits[side][name]
            entry[f"{side}_bits_per_byte"] = total / np.log(2) / nbytes if nbytes else None
        report["spans"][name] = entry
    return report
