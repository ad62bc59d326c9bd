import math

import numpy as np
import pytest
import torch

from vpmoe.train import losses


def test_span_mixing_with_one_span_is_the_token_mean():
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 30), torch.randint(0, 30, (50,))
    spans = torch.full((50,), 2)
    spans[:7] = 0
    per_token = losses.cross_entropy(logits, targets)
    counts = losses.span_counts(spans)
    mixed = losses.span_normalized(per_token, spans, counts, torch.tensor([0.0, 1.0, 1.0]))
    plain = torch.nn.functional.cross_entropy(logits[7:], targets[7:])
    torch.testing.assert_close(mixed, plain)


def test_span_mixing_by_hand_across_micro_batches():
    values = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0])]
    spans = [torch.tensor([1, 1, 2, 0]), torch.tensor([1, 0])]
    counts = sum(losses.span_counts(s) for s in spans)  # global: reasoning 3 tokens, final 1 token
    weights = torch.tensor([0.0, 0.5, 2.0])
    total = sum(losses.span_normalized(v, s, counts, weights) for v, s in zip(values, spans))
    expected = 0.5 * (1 + 2 + 10) / 3 + 2.0 * 3 / 1
    assert math.isclose(total.item(), expected, rel_tol=1e-6)
    # an empty span contributes 0
    only_reasoning = losses.span_normalized(values[1], spans[1], losses.span_counts(spans[1]), weights)
    assert math.isclose(only_reasoning.item(), 0.5 * 10, rel_tol=1e-6)


def reference_topk_kl(logits, ids, logprobs, temperature):
    """float64, written from the definition: K teacher buckets + tail, tempered as buckets."""
    out = []
    for z, i, lp in zip(logits.double().numpy(), ids.numpy(), logprobs.double().numpy()):
        q = np.exp(z / temperature - np.logaddexp.reduce(z / temperature))
        q_buckets = np.append(q[i], 1.0 - q[i].sum())
        p = np.exp(lp)
        p_buckets = np.append(p, 1.0 - p.sum()) ** (1.0 / temperature)
        p_buckets /= p_buckets.sum()
        out.append(temperature**2 * np.sum(p_buckets * (np.log(p_buckets) - np.log(q_buckets))))
    return torch.tensor(out)


def test_topk_kl_matches_float64_reference():
    torch.manual_seed(1)
    n, vocab, k = 12, 300, 8
    logits = torch.randn(n, vocab) * 3
    teacher = torch.log_softmax(torch.randn(n, vocab) * 3, dim=-1)
    logprobs, ids = teacher.topk(k, dim=-1)
    for temperature in (1.0, 2.0, 0.7):
        got = losses.topk_kl(logits, ids.int(), logprobs, temperature)
        want = reference_topk_kl(logits, ids, logprobs, temperature)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_topk_kl_is_zero_when_student_equals_teacher_and_has_gradients():
    torch.manual_seed(2)
    teacher = torch.log_softmax(torch.randn(5, 100), dim=-1)
    logprobs, ids = teacher.topk(10, dim=-1)
    assert losses.topk_kl(teacher, ids, logprobs).abs().max() < 1e-5
    assert losses.topk_kl(teacher, ids, logprobs, temperature=2.0).abs().max() > 1e-4  # tempered buckets differ
    logits = torch.randn(5, 100, requires_grad=True)
    losses.topk_kl(logits, ids[:, :10], logprobs[:, :10]).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_confidence_weights_are_clipped():
    w = losses.confidence_weights(torch.tensor([-10.0, -2.0, -1.0, 0.0, 5.0]), running_mean=-2.0, temperature=1.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 1.0, math.e, 4.0, 4.0]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the fused (compiled) path runs on CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_and_its_gradient_match_float64(device, dtype):
    """Values and gradients against torch's float64 cross-entropy of the same (rounded) logits: within fp32
    rounding for the values; gradients within fp32 rounding, plus the rounding to the logits' dtype."""
    g = torch.Generator().manual_seed(0)
    for rows in (37, 64):  # two row counts: the compiled path must not be tied to one
        logits = (torch.randn(rows, 1000, generator=g) * 4).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, 1000, (rows,), generator=g).to(device)
        weights = torch.rand(rows, generator=g).to(device)
        ce = losses.cross_entropy(logits, targets)
        (ce * weights).sum().backward()
        exact = logits.detach().double().requires_grad_()
        want = torch.nn.functional.cross_entropy(exact, targets, reduction="none")
        (want * weights.double()).sum().backward()
        assert ce.dtype == torch.float32 and logits.grad.dtype == dtype
        assert torch.allclose(ce.double(), want, rtol=1e-6, atol=1e-6)
        unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
        err = (logits.grad.double() - exact.grad).abs()
        assert (err <= unit * exact.grad.abs() + 1e-6 * exact.grad.abs().max()).all()
