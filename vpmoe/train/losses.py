"""Loss terms over the supervised positions of a batch, and span-normalized mixing.

Every term returns per-token values; `span_normalized` turns them into the step's loss:
for each span s, the sum over its tokens divided by the span's token count over the *whole global batch*
(all micro-batches, all ranks; `counts` is known before the first forward), then `sum_s w_s * mean_s`.
Summing these per-micro-batch values over the step gives exactly the global span means, so gradient
accumulation and data parallelism need no rescaling beyond FSDP's own averaging (see trainer).
An empty span contributes 0.
"""

from __future__ import annotations

import functools

import torch

from vpmoe.spans import COUNT as SPAN_COUNT


def span_counts(label_spans: torch.Tensor) -> torch.Tensor:
    """Supervised tokens per span class, [SPAN_COUNT] int64 (index 0 counts unsupervised positions)."""
    return torch.bincount(label_spans.flatten(), minlength=SPAN_COUNT)


def span_sums(values: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Sum of per-token values per span class, [SPAN_COUNT]."""
    out = torch.zeros(SPAN_COUNT, dtype=values.dtype, device=values.device)
    return out.index_add(0, spans, values)


def span_normalized(values: torch.Tensor, spans: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor):
    """sum_s weights[s] * sum(values[spans == s]) / counts[s]; spans with no tokens contribute 0.

    `weights[0]` must be 0 (unsupervised positions never carry loss).
    """
    sums = span_sums(values, spans)
    return (weights * sums / counts.clamp(min=1).to(sums.dtype)).sum()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, [N], of logits [N, V] in any float dtype. The math is fp32's (log-sum-exp
    forward, softmax - one_hot backward, the gradient in the logits' dtype); on CUDA each is one fused pass over the
    logits, so neither an fp32 copy of [N, V] nor its log-softmax is ever written (with the 201,088-wide head these
    were the largest elementwise kernels of the CE step)."""
    return _CrossEntropy.apply(logits, targets)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = _fused(_logsumexp, logits)(logits)
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(-1, targets[:, None]).squeeze(-1).to(lse.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        return _fused(_cross_entropy_grad, logits)(logits, targets, lse, grad), None


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor):
    z = logits.to(lse.dtype)
    one_hot = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    return ((torch.exp(z - lse[:, None]) - one_hot.to(z.dtype)) * grad[:, None].to(z.dtype)).to(logits.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)  # the row count changes with every micro-batch's supervised positions


def _fused(fn, logits: torch.Tensor):
    return _compiled(fn) if logits.is_cuda else fn


def confidence_weights(teacher_logprob: torch.Tensor, running_mean: float, temperature: float) -> torch.Tensor:
    """Token weights exp((teacher_logprob - running_mean) / T), clipped to [0.25, 4]."""
    return torch.exp((teacher_logprob.float() - running_mean) / temperature).clamp(0.25, 4.0)


def topk_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL(teacher || student) over the teacher's top-K tokens plus one tail bucket, times T².

    Teacher buckets: the K stored probabilities and `p_tail = 1 - sum_K p`. Student buckets: the student's
    softmax(z / T) on the same K ids and the rest of its mass. At T != 1 the teacher's K+1 buckets are
    tempered as buckets (p_b^(1/T), renormalized) because the tail's inner distribution is not stored;
    at T = 1 this is the exact KL of the bucketed distributions.
    """
    z = logits.float() / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    student_top = z.gather(-1, topk_ids.long()) - log_z  # [N, K]
    # log of the student's mass outside the K ids, computed without cancellation
    student_tail = torch.logsumexp(z.scatter(-1, topk_ids.long(), float("-inf")), dim=-1, keepdim=True) - log_z
    student = torch.cat([student_top, student_tail], dim=-1)

    teacher_top = topk_logprobs.float()
    top_mass = teacher_top.exp().sum(-1, keepdim=True)
    teacher_tail = torch.log1p(-top_mass.clamp(max=1.0))  # -inf when the K tokens hold all the mass
    # float16 storage can leave the buckets a hair off 1: renormalize (a no-op for exact inputs at T = 1)
    teacher = torch.log_softmax(torch.cat([teacher_top, teacher_tail], dim=-1) / temperature, dim=-1)
    p = teacher.exp()
    kl = torch.where(p > 0, p * (teacher - student), torch.zeros_like(p)).sum(-1)
    return kl * temperature**2
