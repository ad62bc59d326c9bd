"""Packed samples -> documents -> length-bucketed batches, and the map from results back to sample order.

A sample joins documents with one EOD (199999). Scoring treats each document alone: its tokens are fed from
position 0, right-padded to the batch's longest document, under plain causal attention, so no document sees
another and padding (always after the real tokens) is never attended. Only what the supervised predictions need
is fed: the document up to (not including) its last supervised token.

Output order: the supervised positions of a shard in token order (sample by sample, positions ascending), which
is the sidecar's order. A document's supervised positions are contiguous in that order, so each batch result
scatters into a contiguous range per document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vpmoe import tokenizer as tk
from vpmoe.errors import UserError


@dataclass
class Documents:
    """The documents of a run of consecutive samples (flat indices are relative to the first sample's start)."""

    tokens: np.ndarray  # [L] int32, the samples back to back
    sample_lengths: np.ndarray  # [S] int64
    counts: np.ndarray  # [S] int64, supervised positions per sample
    supervised: np.ndarray  # [M] int64, flat index j of every supervised token (predicted from j - 1)
    supervised_spans: np.ndarray  # [M] uint8, span of each supervised token
    doc_start: np.ndarray  # [D] int64, flat index of each scored document's first token
    doc_length: np.ndarray  # [D] int64, tokens fed for the document (its last supervised index)
    doc_first: np.ndarray  # [D] int64, index into `supervised` of the document's first supervised position
    doc_count: np.ndarray  # [D] int64, supervised positions of the document


def split_documents(tokens: np.ndarray, spans: np.ndarray, sample_lengths: np.ndarray, first_sample: int = 0
                    ) -> Documents:
    """Find the documents of consecutive samples and their supervised positions; check the span invariants."""
    tokens = np.asarray(tokens)
    spans = np.asarray(spans)
    sample_lengths = np.asarray(sample_lengths, dtype=np.int64)
    n = len(tokens)
    sample_start = np.concatenate([[0], np.cumsum(sample_lengths)[:-1]]).astype(np.int64)
    is_start = np.zeros(n, dtype=bool)
    is_start[sample_start[sample_lengths > 0]] = True
    is_start[1:] |= tokens[:-1] == tk.EOD
    supervised_mask = spans > 0
    for bad, what in ((supervised_mask & is_start, "the first token of a document"),
                      (supervised_mask & (tokens == tk.EOD), "an EOD separator")):
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            sample = int(np.searchsorted(sample_start, j, side="right") - 1)
            raise UserError(
                f"sample {first_sample + sample}, token {j - sample_start[sample]}: {what} is marked supervised; "
                f"its prediction would cross a document boundary. Rebuild the dataset with `vpmoe data build`"
            )
    supervised = np.flatnonzero(supervised_mask).astype(np.int64)
    doc_of_token = np.cumsum(is_start) - 1
    starts = np.flatnonzero(is_start).astype(np.int64)
    doc_of_sup = doc_of_token[supervised]
    per_doc = np.bincount(doc_of_sup, minlength=len(starts)).astype(np.int64)
    scored = np.flatnonzero(per_doc)
    count = per_doc[scored]
    first = (np.cumsum(count) - count).astype(np.int64)
    last = supervised[first + count - 1]
    sample_of_sup = np.searchsorted(sample_start, supervised, side="right") - 1
    return Documents(
        tokens=tokens,
        sample_lengths=sample_lengths,
        counts=np.bincount(sample_of_sup, minlength=len(sample_lengths)).astype(np.int64),
        supervised=supervised,
        supervised_spans=spans[supervised].astype(np.uint8),
        doc_start=starts[scored],
        doc_length=last - starts[scored],
        doc_first=first,
        doc_count=count,
    )


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, T] int64, right-padded
    rows: np.ndarray  # [N] int64, row of the flattened [B*T] hidden states that predicts each supervised token
    targets: np.ndarray  # [N] int64, the supervised tokens
    dest: np.ndarray  # [N] int64, index of each result in the shard's supervised order
    tokens: int  # real (unpadded) tokens fed


def make_batches(docs: Documents, batch_tokens: int) -> list[Batch]:
    """Group documents by length (longest first) so each batch holds at most `batch_tokens` padded tokens."""
    order = np.argsort(-docs.doc_length, kind="stable")
    batches: list[Batch] = []
    i = 0
    while i < len(order):
        width = int(docs.doc_length[order[i]])
        size = max(1, min(len(order) - i, batch_tokens // max(width, 1)))
        batches.append(_batch(docs, order[i : i + size], width))
        i += size
    return batches


def _batch(docs: Documents, members: np.ndarray, width: int) -> Batch:
    input_ids = np.full((len(members), width), tk.EOD, dtype=np.int64)
    rows, dest = [], []
    for b, d in enumerate(members.tolist()):
        start, length = int(docs.doc_start[d]), int(docs.doc_length[d])
        input_ids[b, :length] = docs.tokens[start : start + length]
        index = np.arange(docs.doc_first[d], docs.doc_first[d] + docs.doc_count[d], dtype=np.int64)
        rows.append(b * width + docs.supervised[index] - start - 1)
        dest.append(index)
    rows_all, dest_all = np.concatenate(rows), np.concatenate(dest)
    return Batch(
        input_ids=input_ids, rows=rows_all, targets=docs.tokens[docs.supervised[dest_all]].astype(np.int64),
        dest=dest_all, tokens=int(docs.doc_length[members].sum()),
    )
