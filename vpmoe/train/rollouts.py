"""Sampled completions as on-policy distillation trains on them: their spans, their training rows, the check that
the teacher scores exactly the sampled ids, and their health statistics.

Spans come from the Harmony structure of the sampled tokens. A prompt ends with `<|start|>assistant`, so the
completion opens its first message's header; every later `<|start|>` opens another message. A message's tokens,
from its header through its closing `<|end|>`/`<|return|>`/`<|call|>`, carry its span: `final` for the final
channel, `reasoning` for every other one (analysis, commentary) and for a header that never names a channel
(malformed, or cut off by max_new_tokens). Structural tokens are counted with the message they open or close.
"""

from __future__ import annotations

import numpy as np
import torch

from vpmoe import spans
from vpmoe import tokenizer as tk
from vpmoe.data.loader import Batch, make_rows
from vpmoe.errors import RunError

PAD_MULTIPLE = 64  # training rows are padded to a multiple of this (fewer distinct shapes for compiled blocks)


def completion_spans(tokens: list[int]) -> np.ndarray:
    """The span of each completion token (uint8, REASONING or FINAL), from its Harmony message's channel."""
    out = np.full(len(tokens), spans.REASONING, dtype=np.uint8)
    starts = [0] + [i for i, t in enumerate(tokens) if t == tk.START and i > 0]
    for first, end in zip(starts, starts[1:] + [len(tokens)]):
        message = tokens[first:end]
        if tk.CHANNEL in message and tk.MESSAGE in message[message.index(tk.CHANNEL):]:
            channel_at = message.index(tk.CHANNEL)
            header_end = message.index(tk.MESSAGE, channel_at)
            words = tk.decode(message[channel_at + 1:header_end]).split()
            if words and words[0] == "final":
                out[first:end] = spans.FINAL
    return out


def training_rows(prompts: list[list[int]], completions: list[list[int]]) -> tuple[Batch, torch.Tensor]:
    """Rows prompt + completion (right-padded) as the loader builds them, with label_spans set on the positions
    that predict a completion token (each with its token's span), and the bool [B, S] mask of those positions."""
    samples = []
    for prompt, completion in zip(prompts, completions):
        tokens = np.array(prompt + completion, dtype=np.int32)
        labels = np.concatenate([np.zeros(len(prompt), np.uint8), completion_spans(completion)])
        samples.append((tokens, labels))
    longest = max(len(t) for t, _ in samples)
    rows = make_rows(samples, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
    batch = Batch(**tensors, sample_index=torch.arange(len(samples)))
    return batch, batch.label_spans > 0


def check_alignment(input_ids: torch.Tensor, select: torch.Tensor, completions: list[list[int]], who: str) -> None:
    """The ids that the positions `select` [B, S] predict (input_ids shifted by one) must be exactly the sampled
    completion ids, row by row: a model that scores anything else would train the student on a wrong target."""
    predicted = input_ids[:, 1:][select[:, :-1]]
    expected = torch.tensor([t for c in completions for t in c], dtype=predicted.dtype, device=predicted.device)
    if select[:, -1].any() or predicted.shape != expected.shape or not torch.equal(predicted, expected):
        rows = [r for r in range(len(completions)) if
                input_ids[r, 1:][select[r, :-1]].tolist() != completions[r]]
        raise RunError(f"the {who}'s scored positions do not predict the sampled completion ids (rows {rows[:5]}): "
                       f"its prompt and the completion are misaligned")


def repetition_rate(completions: list[list[int]], n: int) -> float:
    """Share of the completions' n-grams that repeat an earlier n-gram of the same completion."""
    repeated = total = 0
    for tokens in completions:
        if len(tokens) < n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int32), n)
        keys = np.ascontiguousarray(windows).view(np.dtype((np.void, 4 * n))).ravel()  # one key per n-gram, exact
        total += len(keys)
        repeated += len(keys) - len(np.unique(keys))
    return repeated / max(total, 1)


def parse_failures(completions: list[list[int]]) -> int:
    """Completions that openai-harmony's parser refuses (as an assistant turn's continuation). One without any
    `<|message|>` never completes its first header, which the parser refuses too; it is counted without the parser,
    whose refusal takes ~0.1 s."""
    from openai_harmony import HarmonyError, Role

    encoding = tk.harmony()
    failed = 0
    for tokens in completions:
        if tk.MESSAGE not in tokens:
            failed += 1
            continue
        try:
            encoding.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
        except HarmonyError:
            failed += 1
    return failed


def length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.array(lengths, dtype=np.float64)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}
