"""Held-out loss, perplexity and bits-per-byte per span on one split of a built dataset.

Definitions, for a span class s (reasoning = 1, final = 2; "all" = both together):
  positions   every t with label_spans[t] == s, where the label of position t is token t+1 (vpmoe.data.loader)
  tokens_s    the number of those positions
  nats_s      sum over them of -ln p(label | tokens up to t) under the model (softmax in fp32, sums in fp64)
  loss_s      nats_s / tokens_s                       (mean cross-entropy, nats per token)
  perplexity  exp(loss_s)
  bytes_s     sum over the target tokens of the length of the token's bytes as tiktoken decodes it
              (`decode_single_token_bytes`), which is the UTF-8 length of the span's rendered text; a special
              token counts its literal text (`<|return|>` is 10 bytes)
  bits/byte   nats_s / (ln 2 * bytes_s)
The samples are the first `max_samples` of the split, in order, so every checkpoint sees the same tokens.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch

from vpmoe import provenance, spans
from vpmoe import tokenizer as tk
from vpmoe.data.loader import SplitReader, make_rows
from vpmoe.errors import UserError

SPANS = {**{name: (code,) for code, name in spans.SUPERVISED.items()}, "all": tuple(spans.SUPERVISED)}
CHUNK = 2048  # supervised positions per head + fp32 log-softmax (bounds the [N, vocab] temporary)


@functools.cache
def token_bytes() -> np.ndarray:
    """[VOCAB_SIZE] int64: the byte length of every token id of the o200k Harmony tokenizer."""
    enc = tk.encoding()
    return np.array([len(enc.decode_single_token_bytes(i)) for i in range(tk.VOCAB_SIZE)], dtype=np.int64)


def span_metrics(tokens: int, nats: float, nbytes: int) -> dict:
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "nats": nats,
        "loss": nats / tokens if tokens else None,
        "perplexity": math.exp(min(nats / tokens, 700.0)) if tokens else None,
        "bits_per_byte": nats / (math.log(2) * nbytes) if nbytes else None,
    }


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def heldout_loss(model: torch.nn.Module, dataset: str | Path, split: str = "valid", max_samples: int = 0,
                 batch_size: int = 8) -> dict:
    """Loss / perplexity / bits-per-byte per span over the first `max_samples` samples of `split` (0 = all).

    `model` is a vpmoe Transformer (or anything with its `body(input_ids, position_ids, doc_ids).hidden` [B, S, D]
    and `head(hidden)` -> logits); returns a JSON-ready dict.
    """
    start = time.perf_counter()
    reader = SplitReader(dataset, split)
    n = len(reader) if max_samples == 0 else min(max_samples, len(reader))
    if n == 0:
        raise UserError(f"{dataset}: split {split!r} is empty: nothing to evaluate held-out loss on")
    device = _model_device(model)
    table = torch.from_numpy(token_bytes())
    nats = {s: 0.0 for s in spans.SUPERVISED}
    counts = {s: 0 for s in nats}
    nbytes = {s: 0 for s in nats}
    was_training = model.training
    model.eval()
    try:
        for first in range(0, n, batch_size):
            samples = [reader.sample(i) for i in range(first, min(first + batch_size, n))]
            rows = make_rows(samples, max(len(tokens) for tokens, _ in samples))
            batch = {k: torch.from_numpy(v) for k, v in rows.items()}
            hidden = model.body(batch["input_ids"].to(device), batch["position_ids"].to(device),
                                batch["doc_ids"].to(device)).hidden
            row_spans = batch["label_spans"]
            mask = row_spans > 0
            labels = batch["labels"][mask]
            label_spans = row_spans[mask]
            selected = hidden[mask.to(device)]
            token_nats = torch.empty(len(labels), dtype=torch.float64)
            for lo in range(0, len(labels), CHUNK):  # the head only at supervised positions, a chunk at a time
                logprobs = model.head(selected[lo:lo + CHUNK]).float().log_softmax(-1)
                target = labels[lo:lo + CHUNK].to(device)
                token_nats[lo:lo + CHUNK] = -logprobs.gather(1, target[:, None])[:, 0].double().cpu()
            del hidden, selected
            for s in nats:
                where = label_spans == s
                nats[s] += float(token_nats[where].sum())
                counts[s] += int(where.sum())
                nbytes[s] += int(table[labels[where]].sum())
    finally:
        model.train(was_training)

    result = {
        "dataset": provenance.portable_name(dataset),
        "split": split,
        "samples": n,
        "split_samples": len(reader),
        "spans": {},
    }
    for name, members in SPANS.items():
        result["spans"][name] = span_metrics(
            sum(counts[s] for s in members), sum(nats[s] for s in members), sum(nbytes[s] for s in members))
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
