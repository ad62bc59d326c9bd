"""Losses of the output head, computed in token chunks from final hidden states: never a [tokens x vocab] tensor.

compute(hidden [N, D], weight [V, D], targets=[N], teacher=TeacherHead(...), ce=, forward_kl=, reverse_kl=)
-> HeadLosses with per-token values [N] for each requested term, so the caller weights them (span-normalized)
and the upstream gradient is per token. `cross_entropy`, `forward_kl` and `reverse_kl` are one-term shorthands.
- ce: -log p_S(target) at temperature 1.
- forward_kl: T^2 * KL(p_T || p_S) over the whole vocabulary, both at temperature T (online KD).
- reverse_kl: T^2 * KL(p_S || p_T), gradients through every student logit (exact on-policy distillation).
- side outputs, no gradient, with a teacher and `stats=True`: the student's entropy at T, the teacher's log-prob
  of the target at T, and with `topk=k` the teacher's top-k mass, the student's mass on those k tokens and the
  share of the teacher's top-k ids that are also the student's top-k.
Rows are positions that carry a loss (select them before calling); logits must be finite.

Memory: rows are processed `chunk_size` at a time; the logits of a chunk exist in fp32 ([chunk, V], float64
for float64 inputs) only while that chunk is processed, a few such buffers at a time. Backward recomputes each
chunk's student and teacher logits (the saved tensors are the inputs and the per-token values), so the peak extra
memory is bounded by the chunk, plus the head weight cast to the compute dtype and its gradient accumulator.

Precision: matmuls run in the compute dtype (autocast's when it is on for the hidden states' device, else the
hidden states' dtype), the teacher head in its own weight's dtype; everything after the matmul in fp32 (float64
when the inputs are float64), with each row's log-sum-exp kept in float64 so that log p_S - log p_T is formed as
(z_S - z_T) - (lse_S - lse_T): a KL near 0 is then accurate to ~1e-7 in fp32. The head weight's gradient is
accumulated over chunks in fp32.
The teacher may have another hidden size, dtype and device; no gradient reaches it.

sampled_token_loss(logp_theta, logp_sampler, logp_teacher) is OPD's sampled-token estimator (discount 0);
logp_theta of the sampled tokens is -cross_entropy(hidden, weight, sampled_ids), through the chunked path.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's final-normed hidden states at the same N positions, and its head (no gradient flows)."""

    hidden: torch.Tensor  # [N, D_teacher]
    weight: torch.Tensor  # [V, D_teacher]
    bias: torch.Tensor | None = None  # [V]


@dataclass
class HeadLosses:
    """Per-token values [N]; None where not requested. The first three carry gradients."""

    ce: torch.Tensor | None = None
    forward_kl: torch.Tensor | None = None
    reverse_kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    teacher_logprob: torch.Tensor | None = None
    teacher_topk_mass: torch.Tensor | None = None
    student_mass_on_teacher_topk: torch.Tensor | None = None
    topk_overlap: torch.Tensor | None = None


_OUTPUTS = tuple(HeadLosses.__dataclass_fields__)
_STATS = _OUTPUTS[3:]


@dataclass(frozen=True)
class _Plan:
    ce: bool
    forward_kl: bool
    reverse_kl: bool
    stats: bool
    topk: int
    temperature: float
    chunk_size: int
    compute_dtype: torch.dtype  # of the student's matmuls
    logit_dtype: torch.dtype  # fp32, or float64 for float64 inputs


def compute(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    teacher: TeacherHead | None = None,
    ce: bool = False,
    forward_kl: bool = False,
    reverse_kl: bool = False,
    temperature: float = 1.0,
    stats: bool = False,
    topk: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> HeadLosses:
    """The requested per-token terms in one pass over the chunks (the student logits are computed once per chunk
    in forward and once in backward, whatever the number of terms)."""
    plan = _plan(hidden, weight, targets, teacher, ce, forward_kl, reverse_kl, temperature, stats, topk, chunk_size)
    t = teacher or TeacherHead(None, None)  # type: ignore[arg-type]
    outputs = _ChunkedHead.apply(hidden, weight, targets, t.hidden, t.weight, t.bias, plan)
    return HeadLosses(*outputs)


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token -log p(target) [N] of the head `weight` applied to `hidden`."""
    return compute(hidden, weight, targets=targets, ce=True, chunk_size=chunk_size).ce


def forward_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherHead, *, temperature: float = 1.0,
               chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token T^2 * KL(teacher || student) [N] at temperature T."""
    return compute(hidden, weight, teacher=teacher, forward_kl=True, temperature=temperature,
                   chunk_size=chunk_size).forward_kl


def reverse_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherHead, *, temperature: float = 1.0,
               chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-token T^2 * KL(student || teacher) [N] at temperature T."""
    return compute(hidden, weight, teacher=teacher, reverse_kl=True, temperature=temperature,
                   chunk_size=chunk_size).reverse_kl


def sampled_token_loss(logp_theta: torch.Tensor, logp_sampler: torch.Tensor, logp_teacher: torch.Tensor, *,
                       eps_low: float = 0.2, eps_high: float = 0.28) -> torch.Tensor:
    """OPD's sampled-token estimator, per token [N]: advantage A = -(logp_sampler - logp_teacher) (no gradient),
    ratio r = exp(logp_theta - logp_sampler), loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
    (PPO's pessimistic clip). On-policy (r = 1) its mean over samples is the reverse KL, and its gradient the
    reverse KL's in expectation."""
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    advantage = (logp_teacher - logp_sampler).detach()
    ratio = torch.exp(logp_theta - logp_sampler.detach())
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * advantage, clipped * advantage)


def _plan(hidden, weight, targets, teacher, ce, fkl, rkl, temperature, stats, topk, chunk_size) -> _Plan:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if not (ce or fkl or rkl):
        raise ValueError("no loss requested (ce, forward_kl, reverse_kl)")
    if targets is not None and (targets.shape != (n,) or targets.is_floating_point()):
        raise ValueError(f"targets must be integer ids [{n}], got {targets.dtype} {list(targets.shape)}")
    if ce and targets is None:
        raise ValueError("ce needs targets")
    if teacher is None and (fkl or rkl or stats or topk):
        raise ValueError("forward_kl, reverse_kl and stats need a teacher")
    if teacher is not None:
        th, tw, tb = teacher.hidden, teacher.weight, teacher.bias
        if th.dim() != 2 or tw.dim() != 2 or th.shape[0] != n or th.shape[1] != tw.shape[1]:
            raise ValueError(f"teacher hidden [{n}, D_t] and weight [V, D_t] expected, got {list(th.shape)} "
                             f"and {list(tw.shape)}")
        if tw.shape[0] != vocab:
            raise ValueError(f"teacher vocabulary {tw.shape[0]} differs from the student's {vocab}")
        if tb is not None and tb.shape != (vocab,):
            raise ValueError(f"teacher bias must be [{vocab}], got {list(tb.shape)}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if chunk_size < 1 or topk < 0 or topk > vocab:
        raise ValueError(f"chunk_size >= 1 and 0 <= topk <= vocab expected, got {chunk_size}, {topk}")
    device = hidden.device.type
    cdt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _Plan(ce, fkl, rkl, stats or topk > 0, topk, float(temperature), chunk_size, cdt,
                 torch.promote_types(cdt, torch.float32))


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, t_hidden, t_weight, t_bias, plan: _Plan):
        n = hidden.shape[0]
        targets = targets.long() if targets is not None else None
        wanted = dict(zip(_OUTPUTS, (plan.ce, plan.forward_kl, plan.reverse_kl) + (plan.stats,) * len(_STATS)))
        wanted["teacher_logprob"] &= targets is not None
        for name in _OUTPUTS[-3:]:
            wanted[name] &= plan.topk > 0
        out = {name: hidden.new_empty(n, dtype=plan.logit_dtype) for name, on in wanted.items() if on}
        w = weight.detach().to(plan.compute_dtype)
        with _no_autocast(hidden, t_hidden):
            for rows in _chunks(n, plan.chunk_size):
                tgt = targets[rows] if targets is not None else None
                logits = _chunk_logits(hidden, w, t_hidden, t_weight, t_bias, rows, plan)
                for name, values in _chunk_values(*logits, tgt, plan).items():
                    out[name][rows] = values
                del logits  # the chunk's [rows, V] buffers are free before the next chunk's are made
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, t_hidden, t_weight, t_bias, out.get("reverse_kl"))
        stats = [out[name] for name in _STATS if name in out]
        if stats:
            ctx.mark_non_differentiable(*stats)
        return tuple(out.get(name) for name in _OUTPUTS)

    @staticmethod
    def backward(ctx, g_ce, g_fkl, g_rkl, *_stats):
        hidden, weight, targets, t_hidden, t_weight, t_bias, rkl = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_h, need_w = ctx.needs_input_grad[:2]
        none = (None,) * 5
        if not (need_h or need_w) or (g_ce is None and g_fkl is None and g_rkl is None):
            return (None, None) + none
        w = weight.detach().to(plan.compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator (float64 for float64 inputs), cast to the weight's dtype at the end
        grad_w = torch.zeros(weight.shape, dtype=plan.logit_dtype, device=weight.device) if need_w else None
        with _no_autocast(hidden, t_hidden):
            for rows in _chunks(hidden.shape[0], plan.chunk_size):
                # dz is built in the logits' own buffers; nothing else holds them once it is cast
                dz = _grad_logits(
                    *_chunk_logits(hidden, w, t_hidden, t_weight, t_bias, rows, plan),
                    targets[rows] if targets is not None else None,
                    *(g[rows] if g is not None else None for g in (g_ce, g_fkl, g_rkl)),
                    rkl[rows] if rkl is not None else None, plan,
                ).to(plan.compute_dtype)
                h = hidden[rows].detach().to(plan.compute_dtype)
                if need_h:
                    grad_h[rows] = dz @ w
                if need_w:
                    grad_w.add_(dz.T @ h)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None) + none


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _no_autocast(*tensors) -> ExitStack:
    """The dtypes are explicit here; autocast must not recast the teacher head or the fp32 math."""
    stack = ExitStack()
    for device in {t.device.type for t in tensors if t is not None}:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _chunk_logits(hidden, w, t_hidden, t_weight, t_bias, rows, plan: _Plan):
    """The chunk's raw student logits z and, with a teacher, (z_teacher / T, its log-sum-exp in float64),
    computed on the teacher's device and returned on the student's, z_teacher in the student's logit dtype."""
    z = F.linear(hidden[rows].detach().to(plan.compute_dtype), w).to(plan.logit_dtype)
    if t_hidden is None:
        return z, None
    tw = t_weight.detach()
    zt = F.linear(t_hidden[rows].detach().to(tw.dtype), tw).to(torch.promote_types(tw.dtype, torch.float32))
    if t_bias is not None:
        zt.add_(t_bias.detach())
    zt.div_(plan.temperature)
    lse_t = _logsumexp64(zt)
    return z, (zt.to(z.device, z.dtype), lse_t.to(z.device))


def _logsumexp64(x: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp [C, 1] in float64: the fp32 sum is accurate to ~1e-7 relative, and keeping max + log(sum)
    unrounded makes differences of log-probabilities (the KLs) accurate to ~1e-7 instead of ulp(log V) ~ 1e-6."""
    m = x.amax(-1, keepdim=True)
    return m.double() + (x - m).exp_().sum(-1, keepdim=True).double().log()


def _chunk_values(z, teacher, targets, plan: _Plan) -> dict[str, torch.Tensor]:
    """Per-token values of one chunk. Overwrites z and the teacher's logits; the row reductions multiply into a
    buffer that is dead afterwards, so no product temporaries are made."""
    out = {}
    lse = None
    if plan.ce:
        lse = _logsumexp64(z)
        out["ce"] = (lse - z.gather(1, targets[:, None]).double()).squeeze(1).to(z.dtype)
    if teacher is None:
        return out
    zt, lse_t = teacher
    temp = plan.temperature
    if temp != 1.0 or lse is None:
        lse = _logsumexp64(z.div_(temp))
    if plan.stats:
        if targets is not None:
            out["teacher_logprob"] = (zt.gather(1, targets[:, None]).double() - lse_t).squeeze(1).to(z.dtype)
        if plan.topk:
            out.update(_topk_stats(z, lse, zt, lse_t, plan.topk))
    pt = (zt - lse_t.to(zt.dtype)).exp_() if plan.forward_kl else None
    d = zt.neg_().add_(z).sub_((lse - lse_t).to(z.dtype))  # log p_S - log p_T
    if pt is not None:
        out["forward_kl"] = pt.mul_(d).sum(-1).mul_(-temp * temp)
        del pt
    ls = z.sub_(lse.to(z.dtype))
    if plan.stats:
        ps = ls.exp()
        out["entropy"] = ls.mul_(ps).sum(-1).neg_()
    else:
        ps = ls.exp_()
    if plan.reverse_kl:
        out["reverse_kl"] = d.mul_(ps).sum(-1).mul_(temp * temp)
    return out


def _topk_stats(z, lse, zt, lse_t, k: int) -> dict[str, torch.Tensor]:
    """z, zt: student and teacher logits at T; lse, lse_t: their float64 log-sum-exps [C, 1]."""
    t_val, t_ids = zt.topk(k, dim=-1)
    s_ids = z.topk(k, dim=-1).indices
    return {
        "teacher_topk_mass": (t_val.double() - lse_t).exp().sum(-1).to(z.dtype),
        "student_mass_on_teacher_topk": (z.gather(1, t_ids).double() - lse).exp().sum(-1).to(z.dtype),
        "topk_overlap": (t_ids[:, :, None] == s_ids[:, None, :]).any(-1).to(z.dtype).mean(-1),
    }


def _grad_logits(z, teacher, targets, g_ce, g_fkl, g_rkl, rkl, plan: _Plan) -> torch.Tensor:
    """d(sum_t g_ce ce + g_fkl fkl + g_rkl rkl)/dz for one chunk, built in the buffers of the logits.

    d ce/dz = p1 - onehot(target) (p1: softmax at T = 1); d fkl/dz = T (p_S - p_T);
    d rkl/dz = T p_S (log p_S - log p_T - K) with K = rkl / T^2, the per-token value saved by forward.
    """
    temp = plan.temperature
    dz = None
    ce_on_ps = g_ce is not None and teacher is not None and temp == 1.0  # CE shares p_S when it is at T = 1
    if g_ce is not None and not ce_on_ps:
        lse1 = _logsumexp64(z).to(z.dtype)
        p1 = (z - lse1).exp_() if teacher is not None else z.sub_(lse1).exp_()
        dz = p1.mul_(g_ce[:, None]).scatter_add_(1, targets[:, None], -g_ce[:, None])
    if teacher is None:
        return dz
    zt, lse_t = teacher
    lse = _logsumexp64(z.div_(temp))
    pt = None
    if g_fkl is not None:  # p_T in the teacher logits' own buffer unless the reverse term needs them too
        pt = (zt - lse_t.to(zt.dtype)).exp_() if g_rkl is not None else zt.sub_(lse_t.to(zt.dtype)).exp_()
    d = zt.neg_().add_(z).sub_((lse - lse_t).to(z.dtype)) if g_rkl is not None else None
    ps = z.sub_(lse.to(z.dtype)).exp_()
    if d is not None:
        term = d.sub_((rkl / temp**2)[:, None]).mul_(ps).mul_((temp * g_rkl)[:, None])
        dz = term if dz is None else dz.add_(term)
    coef = None
    if g_fkl is not None:
        coef = temp * g_fkl
    if ce_on_ps:
        coef = g_ce if coef is None else coef + g_ce
    if coef is not None:
        dz = ps.mul_(coef[:, None]) if dz is None else dz.addcmul_(ps, coef[:, None])
    if pt is not None:
        dz.addcmul_(pt, (-temp * g_fkl)[:, None])
    if ce_on_ps:
        dz.scatter_add_(1, targets[:, None], -g_ce[:, None])
    return dz
