"""Greedy and sampled decoding with a KV cache (evaluation, on-policy distillation).

Prompts of different lengths are left-padded; the padding is its own document (doc id 0) so real tokens never
attend to it, and positions start at 0 at each prompt's first real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vpmoe.errors import UserError
from vpmoe.model.cache import KVCache
from vpmoe.model.transformer import Transformer


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] generated ids; pad_id after a row stopped
    logprobs: torch.Tensor  # [B, N] log p(token) under the model (temperature 1, no filtering); 0 after a stop
    lengths: torch.Tensor  # [B] generated tokens per row, a stop token included


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: tuple[int, ...] | list[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Generation:
    """temperature 0 is greedy; otherwise sample from softmax(logits / temperature), optionally restricted to the
    top_k tokens and/or the smallest set with probability >= top_p."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate needs at least one prompt and no empty prompt")
    if temperature < 0 or max_new_tokens < 0:
        raise UserError("temperature and max_new_tokens must be >= 0")
    device = model.embed.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
    index = torch.arange(longest, device=device)[None, :]
    doc_ids = (index >= pads[:, None]).long()
    position_ids = (index - pads[:, None]).clamp(min=0)

    cache = KVCache(model.cfg)
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True  # the prefill needs the head at the last position only
    logits = model(ids, position_ids, doc_ids, cache=cache, logits_at=last).logits
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    position = position_ids[:, -1:]
    ones = torch.ones(batch, 1, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = logits.float()
        token = _choose(logits, temperature, top_k, top_p, generator)
        token_logprob = torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0]
        tokens[:, step] = torch.where(done, pad_id, token)
        logprobs[:, step] = torch.where(done, 0.0, token_logprob)
        lengths += (~done).long()
        done = done | torch.isin(token, stops)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        position = position + 1
        logits = model(token[:, None], position, ones, cache=cache).logits[:, -1]
    return Generation(tokens, logprobs, lengths)


def _choose(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
