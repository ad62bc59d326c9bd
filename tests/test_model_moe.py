"""Router (against Megatron-Core), seq_aux_loss (against float64), expert-bias update, expert paths (against a
per-expert loop), gradients and routing counts."""

import warnings

import pytest
import torch

from vpmoe.model.config import MoESection
from vpmoe.model.moe import MoE, Router, SortedBiasAdd, group_limit_binds, relu2, route, seq_aux_loss, top_k_indices
from vpmoe.model.transformer import Transformer
from vpmoe.testing.models import model_config

f64 = torch.float64
SPEC = MoESection(enabled=True)  # 256 experts, 8 groups, top-4 groups, top-4, scaling 2.5


def megatron_routing(logits, moe, expert_bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    return topk_routing_with_score_function(
        logits, moe.topk, use_pre_softmax=False, num_groups=moe.n_groups, group_topk=moe.group_topk,
        scaling_factor=moe.scaling_factor, score_function="sigmoid", expert_bias=expert_bias)


GROUPINGS = [(8, 4, 4), (8, 2, 4), (4, 1, 4), (8, 1, 2)]  # (n_groups, group_topk, topk); the first is the spec


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_groups,group_topk,topk", GROUPINGS)
def test_router_matches_megatron_core(seed, n_groups, group_topk, topk):
    moe = MoESection(enabled=True, n_groups=n_groups, group_topk=group_topk, topk=topk)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(512, moe.n_experts, generator=g) * 2
    expert_bias = torch.randn(moe.n_experts, generator=g) * 0.3  # large enough to change many selections
    want_probs, want_map = megatron_routing(logits, moe, expert_bias)
    experts, weights = route(logits, moe.topk, moe.n_groups, moe.group_topk, moe.scaling_factor, expert_bias)
    got_map = torch.zeros_like(want_map).scatter(1, experts, True)
    got_probs = torch.zeros_like(want_probs).scatter(1, experts, weights)
    assert torch.equal(got_map, want_map)
    torch.testing.assert_close(got_probs, want_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights.sum(-1), torch.full((512,), 2.5), rtol=1e-6, atol=0)
    # The bias changed the selection (so the test does exercise it), but never the weights' values.
    unbiased, _ = megatron_routing(logits, moe, None)
    assert not torch.equal(unbiased > 0, want_map)
    scores = torch.sigmoid(logits).gather(1, experts)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * 2.5)


def test_spec_group_limit_never_changes_the_plain_top4():
    """With group score = top-1 and group_topk == topk (the spec's Megatron knobs), the groups of the plain top-4
    are always among the 4 best groups, so the group limit selects exactly the plain top-4 of the biased scores."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2000, SPEC.n_experts, generator=g)
    bias = torch.randn(SPEC.n_experts, generator=g) * 0.1
    _, group_limited = megatron_routing(logits, SPEC, bias)  # Megatron-Core applies the group limit
    plain = (torch.sigmoid(logits) + bias).topk(SPEC.topk, dim=-1).indices
    assert torch.equal(group_limited, torch.zeros_like(group_limited).scatter(1, plain, True))
    # So route() may skip it for these knobs, and only for these of the tested groupings.
    assert [group_limit_binds(topk, n, k) for n, k, topk in GROUPINGS] == [False, True, True, True]


def test_router_is_group_limited():
    n_groups, group_topk, topk = 8, 2, 4  # group score = sum of its top-2
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1000, SPEC.n_experts, generator=g)
    experts, _ = route(logits, topk, n_groups, group_topk, 2.5, None)
    groups = experts // (SPEC.n_experts // n_groups)
    top2_sum = torch.sigmoid(logits).view(1000, n_groups, -1).topk(2, dim=-1).values.sum(-1)
    chosen_groups = top2_sum.topk(group_topk, dim=-1).indices
    assert (groups[:, :, None] == chosen_groups[:, None, :]).any(-1).all()
    plain = torch.sigmoid(logits).topk(topk, dim=-1).indices
    assert not torch.equal(plain.sort(-1).values, experts.sort(-1).values)  # the limit did bind somewhere


def reference_seq_aux_loss(logits, topk):
    """Direct transcription of architecture.md section 3, float64, loops over sequences and experts."""
    logits = logits.double()
    batch, seq, n_experts = logits.shape
    losses = []
    for b in range(batch):
        s = torch.sigmoid(logits[b])
        s = s / s.sum(-1, keepdim=True)
        top = [set(row) for row in s.topk(topk, -1).indices.tolist()]
        total = 0.0
        for i in range(n_experts):
            f_i = sum(i in t for t in top) / (topk * seq)
            p_i = s[:, i].mean()
            total = total + f_i * p_i
        losses.append(n_experts * total)
    return torch.stack(losses).mean()


def test_seq_aux_loss_matches_float64_reference_and_is_one_when_balanced():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, 32, generator=g, dtype=f64) * 3
    torch.testing.assert_close(seq_aux_loss(logits, 4).double(), reference_seq_aux_loss(logits, 4),
                               rtol=1e-6, atol=0)
    assert float(seq_aux_loss(logits, 4)) > 1.0  # random logits are not balanced
    flat = torch.zeros(2, 16, 32, dtype=f64)  # uniform scores: every expert has P = 1/E; f sums to 1
    torch.testing.assert_close(seq_aux_loss(flat, 4).double(), torch.tensor(1.0, dtype=f64))


def test_expert_bias_update_moves_under_and_over_loaded_experts_the_right_way():
    cfg = model_config("tiny_moe", "model.vocab_size=64")
    model = Transformer(cfg)
    n_layers, n_experts = len(cfg.moe_layers), cfg.moe.n_experts
    counts = torch.full((n_layers, n_experts), 10, dtype=torch.int64)
    counts[:, 0] = 0  # under-loaded
    counts[:, 1] = 50  # over-loaded
    counts[:, 2] = 12  # slightly over
    counts[0, 3] = 1  # only layer 0 under-loaded
    before = model.expert_biases().clone()
    model.update_expert_bias(counts)
    delta = model.expert_biases() - before
    rate = cfg.moe.bias_update_rate
    mean = counts.double().mean(-1, keepdim=True)
    torch.testing.assert_close(delta.double(), rate * torch.sign(mean - counts.double()), rtol=1e-6, atol=1e-9)
    assert (delta[:, 0] > 0).all() and (delta[:, 1] < 0).all() and (delta[:, 2] < 0).all()
    assert delta[0, 3] > 0 and (delta[1:, 3] > 0).all()  # 10 < mean (mean > 10 because of expert 1)
    with pytest.raises(ValueError):
        model.update_expert_bias(counts[:1])


def test_expert_bias_steers_selection():
    moe = SPEC
    router = Router(8, moe)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(256, 8)
    before = router(x).counts[7]
    router.expert_bias[7] = 1.0  # selection scores are sigmoids in (0, 1): +1 wins every group and slot
    after = router(x)
    assert after.counts[7] == 256 > before
    assert (after.experts == 7).any(-1).all()


def loop_moe(moe: MoE, x: torch.Tensor):
    """Per-expert Python loop: the plainest possible statement of the MoE output."""
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.router(flat)
    out = torch.zeros_like(flat)
    bank = moe.experts
    for e in range(bank.up.shape[0]):
        token, slot = (routing.experts == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = relu2(flat[token] @ bank.up[e].t() + bank.up_bias[e])
        y = h @ bank.down[e].t() + bank.down_bias[e]
        out = out.index_add(0, token, y * routing.weights[token, slot, None].to(y.dtype))
    return moe.shared(x) + out.view_as(x)


def _moe(seed=0):
    cfg = model_config("tiny_moe")
    torch.manual_seed(seed)
    moe = MoE(cfg.model.hidden_size, cfg.moe, bias=True).double()
    moe.reset_parameters(0.3, 0.3)
    with torch.no_grad():
        for bias in (moe.experts.up_bias, moe.experts.down_bias, moe.shared.up.bias, moe.shared.down.bias):
            bias.normal_()
        moe.router.expert_bias.normal_(std=0.1)
    return cfg, moe


@pytest.mark.parametrize("kernel", ["padded_bmm", "loop"])
def test_moe_kernel_equals_per_expert_loop_forward_and_gradients(kernel):
    cfg, moe = _moe()
    x = torch.randn(3, 20, cfg.model.hidden_size, dtype=f64, requires_grad=True)
    got, stats = moe(x, kernel)
    want = loop_moe(moe, x)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    weight = torch.randn_like(got)
    params = [x] + [p for _, p in moe.named_parameters()]
    got_grads = torch.autograd.grad((got * weight).sum(), params)
    want_grads = torch.autograd.grad((want * weight).sum(), params)
    for (name, _), a, b in zip([("x", x)] + list(moe.named_parameters()), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=name)
    named = dict(zip(["x"] + [n for n, _ in moe.named_parameters()], got_grads))
    for name in ("experts.up", "experts.down", "experts.up_bias", "experts.down_bias", "shared.up.weight",
                 "shared.down.weight", "router.weight"):
        assert named[name].abs().sum() > 0, name
    # Counts: every token-slot counted once, per expert.
    assert int(stats.counts.sum()) == 3 * 20 * cfg.moe.topk
    routing = moe.router(x.reshape(-1, x.shape[-1]))
    assert torch.equal(stats.counts, torch.bincount(routing.experts.flatten(), minlength=cfg.moe.n_experts))


def test_seq_aux_loss_gives_the_router_a_gradient():
    cfg, moe = _moe(1)
    x = torch.randn(2, 16, cfg.model.hidden_size, dtype=f64)
    _, stats = moe(x)
    (grad,) = torch.autograd.grad(stats.aux_loss, moe.router.weight)
    assert grad.abs().sum() > 0


def test_model_exposes_aux_loss_and_routing_counts():
    cfg = model_config("tiny_moe", "model.vocab_size=128")
    model = Transformer(cfg)
    ids = torch.randint(0, 128, (2, 24))
    out = model(ids)
    n_moe = cfg.model.n_layers - 1
    assert out.routing_counts.shape == (n_moe, cfg.moe.n_experts)
    assert out.routing_counts.dtype == torch.int64
    assert (out.routing_counts.sum(-1) == 2 * 24 * cfg.moe.topk).all()
    assert out.aux_loss.ndim == 0 and float(out.aux_loss.detach()) >= n_moe * 0.99  # each layer's loss is >= ~1
    dense = Transformer(model_config("tiny_real", "model.vocab_size=128"))(ids)
    assert dense.aux_loss is None and dense.routing_counts is None


def test_top_k_indices_equals_torch_topk():
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 4):
        assert torch.equal(top_k_indices(x, k), x.topk(k, dim=-1).indices)


def test_sorted_bias_add_gradient_equals_index_select_autograd():
    """The bias gradient is a bf16 GEMM (as the expert weights' gradients): within bf16 rounding of the
    float64 index_select autograd; the row gradient passes through exactly."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 21])  # empty experts, odd sizes
    experts = torch.repeat_interleave(torch.arange(len(counts)), counts)
    rows = torch.randn(int(counts.sum()), 32, generator=g).bfloat16().requires_grad_()
    bias = torch.randn(len(counts), 32, generator=g, requires_grad=True)
    weight = torch.randn(int(counts.sum()), 32, generator=g)
    got = SortedBiasAdd.apply(rows, bias, experts, torch.bfloat16)
    rows64, bias64 = rows.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    want = rows64 + bias64.index_select(0, experts)
    torch.testing.assert_close(got.double(), want)
    got_rows, got_bias = torch.autograd.grad((got * weight).sum(), [rows, bias])
    want_rows, want_bias = torch.autograd.grad((want * weight.double()).sum(), [rows64, bias64])
    assert got_bias.dtype == torch.float32 and got_rows.dtype == torch.bfloat16
    torch.testing.assert_close(got_rows.double(), want_rows.bfloat16().double(), rtol=0, atol=0)
    torch.testing.assert_close(got_bias.double(), want_bias, rtol=2e-2, atol=2e-2)
    assert (got_bias[[1, 4]] == 0).all()


@pytest.mark.parametrize("repeat", [1, 4])
def test_permuted_rows_gradient_equals_index_select_autograd(repeat):
    """PermutedRows' gather backward equals autograd's index_add backward of index_select, in float64."""
    from vpmoe.model.moe import PermutedRows

    torch.manual_seed(repeat)
    x = torch.randn(37, 6, dtype=f64, requires_grad=True)
    index = torch.randperm(37 * repeat)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(index.numel()))
    got = PermutedRows.apply(x, index, inverse, repeat)
    want = x.index_select(0, index // repeat)
    assert torch.equal(got, want)
    weight = torch.randn_like(got)
    (got_grad,) = torch.autograd.grad((got * weight).sum(), x)
    (want_grad,) = torch.autograd.grad((want * weight).sum(), x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
