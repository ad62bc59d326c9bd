"""Chunked head losses against float64 full-softmax autograd, TRL's generalized JSD, and hand computations."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from vpmoe.train import head_losses as hl

F64 = torch.float64
TERMS = ("ce", "forward_kl", "reverse_kl")


def problem(n=13, d=5, d_teacher=7, vocab=11, dtype=F64, seed=0, bias=True):
    """Student hidden/head (with gradients) and a teacher of another hidden size, with a bias."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=dtype) * 1.5).requires_grad_()
    weight = torch.randn(vocab, d, generator=g, dtype=dtype).requires_grad_()
    teacher = hl.TeacherHead(
        torch.randn(n, d_teacher, generator=g, dtype=dtype) * 1.5,
        torch.randn(vocab, d_teacher, generator=g, dtype=dtype),
        torch.randn(vocab, generator=g, dtype=dtype) if bias else None,
    )
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, teacher, targets


def reference_terms(hidden, weight, teacher, targets, temperature):
    """float64 full-vocabulary math written from the definitions; differentiable through hidden and weight."""
    z = hidden.double() @ weight.double().T
    zt = teacher.hidden.double() @ teacher.weight.double().T
    if teacher.bias is not None:
        zt = zt + teacher.bias.double()
    log_s, log_t = torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1)
    t2 = temperature**2
    return {
        "ce": -torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1),
        "forward_kl": t2 * (log_t.exp() * (log_t - log_s)).sum(-1),
        "reverse_kl": t2 * (log_s.exp() * (log_s - log_t)).sum(-1),
        "entropy": -(log_s.exp() * log_s).sum(-1),
        "teacher_logprob": log_t.gather(1, targets[:, None]).squeeze(1),
        "log_s": log_s,
        "log_t": log_t,
    }


def close(got, want, rtol=1e-12):
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-3))


def grads(values, upstream, inputs):
    total = sum((v * g).sum() for v, g in zip(values, upstream))
    return torch.autograd.grad(total, [x for x in inputs if x.requires_grad])


@pytest.mark.parametrize("terms", [("ce",), ("forward_kl",), ("reverse_kl",), ("ce", "forward_kl"),
                                   ("forward_kl", "reverse_kl"), TERMS])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])  # 5 does not divide 13
def test_chunked_terms_and_gradients_equal_float64_full_softmax(terms, temperature, chunk):
    hidden, weight, teacher, targets = problem()
    upstream = [torch.rand(13, generator=torch.Generator().manual_seed(i), dtype=F64) + 0.1 for i in range(3)]
    kd = any(t != "ce" for t in terms)
    out = hl.compute(hidden, weight, targets=targets, teacher=teacher if kd else None,
                     temperature=temperature, chunk_size=chunk, **{t: True for t in terms})
    ref = reference_terms(hidden, weight, teacher, targets, temperature)
    for name in TERMS:
        if name in terms:
            close(getattr(out, name), ref[name].detach())
        else:
            assert getattr(out, name) is None
    got = grads([getattr(out, t) for t in terms], upstream, [hidden, weight])
    want = grads([ref[t] for t in terms], upstream, [hidden, weight])
    for g, w in zip(got, want):
        close(g, w)


def test_one_term_shorthands_equal_compute():
    hidden, weight, teacher, targets = problem(seed=3)
    ref = reference_terms(hidden, weight, teacher, targets, 1.5)
    close(hl.cross_entropy(hidden, weight, targets, chunk_size=4), ref["ce"].detach())
    close(hl.forward_kl(hidden, weight, teacher, temperature=1.5, chunk_size=4), ref["forward_kl"].detach())
    close(hl.reverse_kl(hidden, weight, teacher, temperature=1.5, chunk_size=4), ref["reverse_kl"].detach())


@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_frozen_head_or_frozen_hidden(trainable):
    hidden, weight, teacher, targets = problem(seed=1)
    (weight if trainable == "hidden" else hidden).requires_grad_(False)
    upstream = [torch.linspace(0.5, 2.0, 13, dtype=F64)] * 3
    out = hl.compute(hidden, weight, targets=targets, teacher=teacher, ce=True, forward_kl=True, reverse_kl=True,
                     chunk_size=4)
    ref = reference_terms(hidden, weight, teacher, targets, 1.0)
    (got,) = grads([out.ce, out.forward_kl, out.reverse_kl], upstream, [hidden, weight])
    (want,) = grads([ref[t] for t in TERMS], upstream, [hidden, weight])
    close(got, want)
    out = hl.compute(hidden, weight, teacher=teacher, reverse_kl=True, chunk_size=4)
    out.reverse_kl.sum().backward()
    assert (weight.grad is None) == (trainable == "hidden") and (hidden.grad is None) == (trainable == "weight")


def test_side_statistics_equal_float64_reference():
    hidden, weight, teacher, targets = problem(n=9, vocab=40, seed=4)
    k, temperature = 5, 1.3
    out = hl.compute(hidden, weight, targets=targets, teacher=teacher, reverse_kl=True, stats=True, topk=k,
                     temperature=temperature, chunk_size=4)
    ref = reference_terms(hidden, weight, teacher, targets, temperature)
    close(out.entropy, ref["entropy"].detach())
    close(out.teacher_logprob, ref["teacher_logprob"])
    log_s, log_t = ref["log_s"].detach(), ref["log_t"]
    for row in range(9):
        t_top = sorted(range(40), key=lambda v: -log_t[row, v].item())[:k]
        s_top = sorted(range(40), key=lambda v: -log_s[row, v].item())[:k]
        assert math.isclose(out.teacher_topk_mass[row].item(), sum(math.exp(log_t[row, v]) for v in t_top),
                            rel_tol=1e-12)
        assert math.isclose(out.student_mass_on_teacher_topk[row].item(),
                            sum(math.exp(log_s[row, v]) for v in t_top), rel_tol=1e-12)
        assert out.topk_overlap[row].item() == len(set(t_top) & set(s_top)) / k
    assert not out.entropy.requires_grad and out.reverse_kl.requires_grad


def trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta,term", [(1.0, "reverse_kl"), (0.0, "forward_kl")])
def test_kl_and_gradient_equal_trl_generalized_jsd(beta, term, temperature):
    """TRL: beta = 1 is KL(student || teacher), beta = 0 KL(teacher || student), both at logits / T without the
    T^2 factor; with labels and reduction "batchmean", the sum over unmasked tokens divided by their count."""
    batch, seq, d, vocab = 2, 6, 5, 17
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, seq, d, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=F64, requires_grad=True)
    t_hidden = torch.randn(batch, seq, 8, generator=g, dtype=F64)
    t_weight = torch.randn(vocab, 8, generator=g, dtype=F64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    labels[1, 4:] = -100
    mask = labels != -100

    want = trl_jsd()(hidden @ weight.T, t_hidden @ t_weight.T, labels=labels, beta=beta, temperature=temperature,
                     reduction="batchmean")
    per_token = getattr(hl, term)(hidden[mask], weight, hl.TeacherHead(t_hidden[mask], t_weight),
                                  temperature=temperature, chunk_size=3)
    got = per_token.mean() / temperature**2
    close(got, want.detach())
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_teacher_equal_to_student_gives_zero_kl_over_the_real_vocabulary(dtype):
    """The teacher computes the same logits another way: a wider hidden size (zero-padded states, extra head
    columns) in float64; the KL is 0 to rounding over all 201,088 ids, both directions (logits of std 3, as a
    language model's; the student's own fp32 logits differ from the teacher's by ~1e-7 relative)."""
    n, d, vocab = 6, 16, 201088
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.75
    t_hidden = torch.cat([hidden.double(), torch.zeros(n, 5, dtype=F64)], 1)
    t_weight = torch.cat([weight.double(), torch.randn(vocab, 5, generator=g, dtype=F64)], 1)
    for teacher in (hl.TeacherHead(hidden, weight), hl.TeacherHead(t_hidden, t_weight)):
        out = hl.compute(hidden, weight, teacher=teacher, forward_kl=True, reverse_kl=True, chunk_size=4)
        assert out.forward_kl.abs().max() <= 1e-6 and out.reverse_kl.abs().max() <= 1e-6
    other = hl.TeacherHead(t_hidden, t_weight * 1.1)
    assert hl.forward_kl(hidden, weight, other).min() > 1e-4 and hl.reverse_kl(hidden, weight, other).min() > 1e-4


def test_bf16_autocast_on_cpu_matches_the_naive_autocast_head():
    """Under autocast the head runs in bf16 (logits fp32 per chunk); gradients come back in the inputs' dtypes."""
    hidden, weight, teacher, targets = problem(n=40, d=32, d_teacher=48, vocab=300, dtype=torch.float32, seed=7)
    teacher = hl.TeacherHead(teacher.hidden.bfloat16(), teacher.weight.bfloat16(), None)
    upstream = [torch.rand(40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hl.compute(hidden, weight, targets=targets, teacher=teacher, ce=True, forward_kl=True,
                         reverse_kl=True, chunk_size=16)
        z = F.linear(hidden, weight).float()
    zt = F.linear(teacher.hidden, teacher.weight).float()
    log_s, log_t = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    naive = [F.cross_entropy(z, targets, reduction="none"), (log_t.exp() * (log_t - log_s)).sum(-1),
             (log_s.exp() * (log_s - log_t)).sum(-1)]
    got = grads([out.ce, out.forward_kl, out.reverse_kl], upstream, [hidden, weight])
    want = grads(naive, upstream, [hidden, weight])
    assert all(v.dtype == torch.float32 for v in (out.ce, *got))
    for a, b in zip([out.ce, out.forward_kl, out.reverse_kl, *got], [*naive, *want]):
        torch.testing.assert_close(a, b.detach(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
    # and it is the bf16 head, not the fp32 one
    fp32 = hl.cross_entropy(hidden, weight, targets)
    assert (fp32 - out.ce).abs().max() > 1e-4


def test_empty_input_and_refusals():
    hidden, weight, teacher, targets = problem()
    empty = hl.compute(hidden[:0], weight, targets=targets[:0], teacher=hl.TeacherHead(
        teacher.hidden[:0], teacher.weight), ce=True, reverse_kl=True)
    assert empty.ce.shape == (0,) and empty.reverse_kl.shape == (0,)
    (empty.ce.sum() + empty.reverse_kl.sum()).backward()
    assert weight.grad.abs().max() == 0
    wrong_vocab = hl.TeacherHead(teacher.hidden, teacher.weight[:-1])
    with pytest.raises(ValueError, match="teacher vocabulary 10 differs from the student's 11"):
        hl.forward_kl(hidden, weight, wrong_vocab)
    with pytest.raises(ValueError, match="no loss requested"):
        hl.compute(hidden, weight, targets=targets)
    with pytest.raises(ValueError, match="ce needs targets"):
        hl.compute(hidden, weight, ce=True)
    with pytest.raises(ValueError, match="need a teacher"):
        hl.compute(hidden, weight, reverse_kl=True)
    with pytest.raises(ValueError, match="teacher hidden"):
        hl.reverse_kl(hidden, weight, hl.TeacherHead(teacher.hidden[1:], teacher.weight))
    with pytest.raises(ValueError, match="temperature"):
        hl.reverse_kl(hidden, weight, teacher, temperature=0.0)


def test_sampled_token_loss_equals_hand_computation():
    lp_theta = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2, -0.7], dtype=F64, requires_grad=True)
    lp_sampler = torch.tensor([-1.1, -1.5, -0.9, -2.0, -1.2, -0.3], dtype=F64)
    lp_teacher = torch.tensor([-0.4, -2.5, -1.9, -1.0, -3.0, -0.1], dtype=F64)
    eps_low, eps_high = 0.2, 0.28
    loss = hl.sampled_token_loss(lp_theta, lp_sampler, lp_teacher, eps_low=eps_low, eps_high=eps_high)
    (grad,) = torch.autograd.grad(loss.sum(), lp_theta)
    for i in range(6):
        adv = -(lp_sampler[i].item() - lp_teacher[i].item())
        ratio = math.exp(lp_theta[i].item() - lp_sampler[i].item())
        clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
        unclipped_is_min = ratio * adv <= clipped * adv
        assert math.isclose(loss[i].item(), -min(ratio * adv, clipped * adv), rel_tol=1e-12)
        # d(-r A)/d logp_theta = -r A where the unclipped term is the minimum, else 0 (clipped, constant)
        want = -ratio * adv if unclipped_is_min else 0.0
        assert math.isclose(grad[i].item(), want, rel_tol=1e-12, abs_tol=1e-15), i
    assert (grad == 0).any() and (grad != 0).any()  # both branches were exercised


def test_sampled_estimator_averages_to_the_exact_reverse_kl_and_its_gradient():
    """On-policy samples x ~ p_S: the mean loss is E[log p_S(x) - log p_T(x)] = KL(p_S || p_T), and the mean
    gradient is the exact reverse KL's gradient (score function), each within 5 standard errors."""
    n, vocab, samples = 3, 7, 20000
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(n, vocab, generator=g, dtype=F64, requires_grad=True)
    eye = torch.eye(vocab, dtype=F64)  # head = identity: the hidden states are the logits
    teacher = hl.TeacherHead(torch.randn(n, vocab, generator=g, dtype=F64), eye)
    exact = hl.reverse_kl(logits, eye, teacher)
    (exact_grad,) = torch.autograd.grad(exact.sum(), logits)

    probs = torch.softmax(logits.detach(), -1)
    x = torch.multinomial(probs, samples, replacement=True, generator=g)  # [n, samples]
    rows = logits.repeat_interleave(samples, 0)
    lp_theta = -hl.cross_entropy(rows, eye, x.flatten(), chunk_size=4096)
    lp_teacher = torch.log_softmax(teacher.hidden, -1).gather(1, x).flatten()
    loss = hl.sampled_token_loss(lp_theta, lp_theta.detach(), lp_teacher).view(n, samples)
    estimate = loss.mean(1)
    (estimate_grad,) = torch.autograd.grad(estimate.sum(), logits)

    k1 = loss.detach()
    assert ((estimate.detach() - exact.detach()).abs() <= 5 * k1.std(1) / math.sqrt(samples)).all()
    # per-sample gradient wrt the logits: k1 * (onehot(x) - p_S)
    per_sample = k1[:, :, None] * (F.one_hot(x, vocab).to(F64) - probs[:, None, :])
    stderr = per_sample.std(1) / math.sqrt(samples)
    assert ((estimate_grad - exact_grad).abs() <= 5 * stderr + 1e-12).all()
    assert exact.min() > 0.05  # a real divergence, not a trivially passing 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_teacher_on_cpu_and_bounded_memory():
    """bf16 autocast on CUDA with the teacher head on the CPU: values and gradients match the fp32 naive head to
    bf16 accuracy; the peak extra memory stays far below one [N, V] fp32 tensor."""
    n, d, d_teacher, vocab, chunk = 4096, 64, 96, 201088, 256
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(n, d, generator=g).cuda().requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) / 4).cuda().requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g).cuda()
    t_hidden = torch.randn(n, d_teacher, generator=g)
    t_weight = torch.randn(vocab, d_teacher, generator=g) / 4
    cpu_teacher = hl.TeacherHead(t_hidden[:256], t_weight)

    rows = slice(0, 256)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = hl.compute(hidden[rows], weight, targets=targets[rows], teacher=cpu_teacher, ce=True,
                         forward_kl=True, reverse_kl=True, chunk_size=64)
    total = (out.ce + out.forward_kl + out.reverse_kl).sum()
    got = torch.autograd.grad(total, (hidden, weight))
    z = hidden[rows] @ weight.T
    log_s, log_t = torch.log_softmax(z, -1), torch.log_softmax((t_hidden[:256] @ t_weight.T).cuda(), -1)
    naive = (F.cross_entropy(z, targets[rows], reduction="none") + (log_t.exp() * (log_t - log_s)).sum(-1)
             + (log_s.exp() * (log_s - log_t)).sum(-1))
    want = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip([out.ce + out.forward_kl + out.reverse_kl, *got], [naive.detach(), *want]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2

    teacher = hl.TeacherHead(t_hidden.cuda().bfloat16(), t_weight.cuda().bfloat16())
    weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = hl.compute(hidden, weight, targets=targets, teacher=teacher, ce=True, forward_kl=True,
                         reverse_kl=True, chunk_size=chunk)
    (out.ce + out.forward_kl + out.reverse_kl).sum().backward()
    extra = torch.cuda.max_memory_allocated() - base
    head = weight.numel() * (4 + 2 + 4)  # its fp32 gradient, the bf16 cast, one bf16 partial per chunk
    assert extra < head + 6 * chunk * vocab * 4 < n * vocab * 4


def test_forward_kl_equals_offline_topk_kl_when_the_sidecar_holds_the_whole_vocabulary():
    """kd_offline's top-K + tail KL (losses.topk_kl) with K = V - 1 (the tail bucket is the last token) is the
    full forward KL that kd_online computes. (K = V itself gives inf there: the fp32 top-K mass falls a hair short
    of 1, so the teacher's tail is > 0 where the student's is exactly 0.)"""
    from vpmoe.train import losses

    hidden, weight, teacher, _ = problem(n=10, vocab=23, seed=10, bias=False)
    log_t = torch.log_softmax(teacher.hidden @ teacher.weight.T, -1)
    topk_logprobs, topk_ids = log_t.topk(22, dim=-1)
    offline = losses.topk_kl(hidden @ weight.T, topk_ids, topk_logprobs)  # fp32 inside
    online = hl.forward_kl(hidden, weight, teacher, chunk_size=3)
    torch.testing.assert_close(online, offline.double().detach(), rtol=1e-5, atol=1e-6)
