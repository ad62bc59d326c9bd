"""Top-K log-probabilities over the full vocabulary, in chunks so memory stays bounded at vocabulary 201088.

For each chunk of hidden states the head's logits are formed in fp32 (a bf16 head's product is accumulated and
returned in fp32, never rounded to bf16), normalized over the full vocabulary (temperature 1), and reduced to:
the top-K ids and log-probs, the log-prob of the actual next token, the entropy and the top-K mass. Peak extra
memory is two fp32 buffers of `chunk x vocab` (logits and probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scores:
    topk_ids: torch.Tensor  # [N, K] int32, by decreasing log-prob
    topk_logprobs: torch.Tensor  # [N, K] float32
    target_logprob: torch.Tensor  # [N] float32
    entropy: torch.Tensor  # [N] float32, nats, over the full vocabulary
    topk_mass: torch.Tensor  # [N] float32, sum of the top-K probabilities


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of `hidden @ weight.T (+ bias)`; low-precision operands are accumulated and kept in fp32."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        logits = hidden @ weight.t()
    elif hidden.is_cuda:
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:  # the CPU has no mm with an fp32 output for bf16/fp16 operands: upcast them (the same products, exactly)
        logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits += bias.float()
    return logits


def topk_grouped(x: torch.Tensor, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (sorted, largest) for wide rows, reading `x` about once.

    The row is cut into groups of `group` values; the top K values lie in the K groups with the largest maxima
    (a group holding one of them has a maximum at least the K-th value, and fewer than K groups can beat it), so
    one max-reduction over `x` and a top-K over K * group candidates give the exact result. torch.topk's radix
    select reads a 201088-wide fp32 row several times. Rows the groups do not tile use torch.topk.
    """
    n, v = x.shape
    if v % group or k * group >= v:
        return torch.topk(x, k, dim=-1, sorted=True)
    groups = x.view(n, v // group, group).amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = (groups[:, :, None] * group + torch.arange(group, device=x.device)).view(n, k * group)
    values, where = x.gather(1, candidates).topk(k, dim=-1, sorted=True)
    return values, candidates.gather(1, where)


@torch.no_grad()
def score_positions(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
    chunk: int,
) -> Scores:
    """Score N positions: `hidden` [N, H] final hidden states, `targets` [N] the actual next tokens.

    Per chunk (passes over the chunk x vocab fp32 buffers in brackets): logits [write], softmax [3 reads,
    write], the top-K by group maxima [read], entropy from sum(p * logit) [2 reads, write, read]. The
    log-normalizer comes from the top-1 entry, logsumexp = logit_max - log(p_max), with p_max >= 1 / vocab, so
    every log-prob is `logit - logsumexp` from fp32 logits (no log of a tiny probability).
    """
    n = hidden.shape[0]
    device = hidden.device
    out = Scores(
        topk_ids=torch.empty(n, k, dtype=torch.int32, device=device),
        topk_logprobs=torch.empty(n, k, dtype=torch.float32, device=device),
        target_logprob=torch.empty(n, dtype=torch.float32, device=device),
        entropy=torch.empty(n, dtype=torch.float32, device=device),
        topk_mass=torch.empty(n, dtype=torch.float32, device=device),
    )
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        logits = head_logits(hidden[start:stop], weight, bias)
        probs = torch.softmax(logits, dim=-1)
        values, ids = topk_grouped(logits, k)
        lse = values[:, 0] - torch.log(probs.gather(1, ids[:, :1]).squeeze(1))
        top = values - lse[:, None]
        out.topk_ids[start:stop] = ids
        out.topk_logprobs[start:stop] = top
        out.topk_mass[start:stop] = top.exp().sum(-1)
        out.target_logprob[start:stop] = logits.gather(1, targets[start:stop, None].long()).squeeze(1) - lse
        # entropy = logsumexp - sum(p * logit), the sum a library reduction (a long fp32 dot product drifted by
        # ~1e-4 relative over 201,088 entries); probs is not needed afterwards, so it holds the products
        out.entropy[start:stop] = lse - probs.mul_(logits).sum(-1)
        del logits, probs
    return out
