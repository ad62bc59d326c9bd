"""Layer pairs, projections (least squares, standardization, cosine term) and block-output capture."""

import pytest
import torch
import torch.nn.functional as F

from vpmoe.model import build_model
from vpmoe.testing.models import model_config
from vpmoe.testing.teachers import gpt_oss_config, random_gpt_oss
from vpmoe.train import hidden_distill as hd

F64 = torch.float64


@pytest.mark.parametrize("n_student,n_teacher,count,expected", [
    # by hand from s_k = round(k L_s / count) - 1, t = round((s + 1) L_t / L_s) - 1, halves up
    (80, 36, 5, [(15, 6), (31, 13), (47, 21), (63, 28), (79, 35)]),  # 16*.45 = 7.2, 32*.45 = 14.4, 21.6, 28.8, 36
    (28, 36, 4, [(6, 8), (13, 17), (20, 26), (27, 35)]),  # 7*36/28 = 9, 18, 27, 36
    (4, 2, 5, [(0, 0), (1, 0), (2, 1), (3, 1)]),  # count capped at 4; 0.5 -> 1 and 1.5 -> 2 (half up)
    (10, 10, 3, [(2, 2), (6, 6), (9, 9)]),  # 3.33 -> 3, 6.67 -> 7, 10
    (80, 2, 5, [(15, 0), (31, 0), (47, 0), (63, 1), (79, 1)]),  # 0.4 -> 0 would be -1: clamped to block 0
])
def test_auto_layer_pairs(n_student, n_teacher, count, expected):
    assert hd.layer_pairs("auto", n_student, n_teacher, count) == expected


def test_auto_layer_pairs_always_include_the_final_outputs():
    for n_student in range(1, 30):
        for n_teacher in range(1, 30):
            pairs = hd.auto_layer_pairs(n_student, n_teacher)
            assert pairs[-1] == (n_student - 1, n_teacher - 1)
            assert all(0 <= s < n_student and 0 <= t < n_teacher for s, t in pairs)
            assert len({s for s, _ in pairs}) == len(pairs) == min(hd.AUTO_PAIRS, n_student)


def test_explicit_layer_pairs_are_validated():
    assert hd.layer_pairs([[0, 1], [3, 5]], 4, 6) == [(0, 1), (3, 5)]
    cases = {
        "student layer 4 is out of range 0..3": [[4, 0]],
        "teacher layer -1 is out of range 0..5": [[1, -1]],
        "appears twice": [[1, 2], [1, 2]],
        "expected \\[student_layer, teacher_layer\\] integers": [[1, 2, 3]],
        "layer pair 1: expected": [[1, 2], [1.0, 2]],
        'must be "auto"': "all",
    }
    for message, spec in cases.items():
        with pytest.raises(ValueError, match=message):
            hd.layer_pairs(spec, 4, 6)
    with pytest.raises(ValueError, match="non-empty list"):
        hd.layer_pairs([], 4, 6)


def normal_equations(x, y):
    return torch.cat([x.T @ x, x.T @ y], dim=1)


def test_least_squares_recovers_a_known_linear_map_and_reduce_makes_it_global():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=F64)
    a = torch.randn(9, 6, generator=g, dtype=F64)
    y = x @ a.T
    module = hd.HiddenProjections([(0, 0)], 6, 9).double()
    module.fit_least_squares([x], [y], ridge=1e-14)
    torch.testing.assert_close(module.proj[0].weight, a, rtol=1e-10, atol=1e-10)
    # rank 0 of two holds half the tokens; `reduce` adds rank 1's normal equations: the same fit
    halves = hd.HiddenProjections([(0, 0)], 6, 9).double()
    halves.fit_least_squares([x[:150]], [y[:150]], ridge=1e-14,
                             reduce=lambda t: t.add_(normal_equations(x[150:], y[150:])))
    torch.testing.assert_close(halves.proj[0].weight, a, rtol=1e-10, atol=1e-10)
    # the ridge shrinks: lambda = ridge * trace(X^T X) / d_s, from the closed form
    module.fit_least_squares([x], [y], ridge=0.5)
    gram = x.T @ x
    want = torch.linalg.solve(gram + 0.5 * gram.trace() / 6 * torch.eye(6, dtype=F64), x.T @ y).T
    torch.testing.assert_close(module.proj[0].weight, want, rtol=1e-12, atol=1e-12)


def test_standardization_statistics_and_the_standardized_least_squares_target():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 5, generator=g, dtype=F64)
    x = x - x.mean(0)  # centered student states: the standardized target is then exactly linear in them
    a = torch.randn(7, 5, generator=g, dtype=F64)
    scale = torch.tensor([1.0, 50.0, 0.1, 3.0, 1000.0, 2.0, 0.5], dtype=F64)  # a few huge dimensions
    shift = torch.randn(7, generator=g, dtype=F64) * 100
    y = x @ a.T * scale + shift
    module = hd.HiddenProjections([(0, 0), (1, 1)], 5, 7, standardize=True, eps=1e-6).double()
    module.update_statistics([y[:100], y[:100] * 2])
    module.update_statistics([y[100:], y[100:] * 2], reduce=lambda t: None)
    for pair, states in enumerate((y, y * 2)):
        std = (states.var(0, unbiased=False) + 1e-6).sqrt()
        torch.testing.assert_close(module.target(pair, states), (states - states.mean(0)) / std, rtol=1e-9,
                                   atol=1e-9)
    module.fit_least_squares([x, x], [y, y * 2], ridge=1e-14)
    std = (y.var(0, unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(module.proj[0].weight, a * (scale / std)[:, None], rtol=1e-9, atol=1e-9)

    # the statistics are buffers: a module restored from the state_dict standardizes identically
    restored = hd.HiddenProjections([(0, 0), (1, 1)], 5, 7, standardize=True).double()
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.target(1, y), module.target(1, y))
    assert set(module.state_dict()) == {"proj.0.weight", "proj.1.weight", "stat_count", "stat_sum", "stat_sumsq"}


def test_cosine_term_is_zero_for_identity_projections_and_equal_states():
    g = torch.Generator().manual_seed(2)
    states = [torch.randn(12, 8, generator=g) for _ in range(3)]
    module = hd.HiddenProjections([(0, 1), (2, 3), (4, 5)], 8, 8)
    with torch.no_grad():
        for proj in module.proj:
            proj.weight.copy_(torch.eye(8))
    assert module(states, states).abs().max() <= 1e-6
    assert module(states, [-s for s in states]).min() > 2 - 1e-6  # opposite directions: 1 - (-1)


def test_cosine_term_equals_float64_reference_and_trains_only_the_student_side():
    g = torch.Generator().manual_seed(3)
    h_s = [torch.randn(10, 4, generator=g, requires_grad=True) for _ in range(2)]
    h_t = [torch.randn(10, 6, generator=g, requires_grad=True) for _ in range(2)]
    module = hd.HiddenProjections([(1, 2), (3, 5)], 4, 6)
    per_pair = module.pair_losses(h_s, h_t)
    for p in range(2):
        u = h_s[p].detach().double() @ module.proj[p].weight.detach().double().T
        v = h_t[p].detach().double()
        want = 1 - (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        torch.testing.assert_close(per_pair[p].double(), want, rtol=1e-5, atol=1e-6)
    loss = module(h_s, h_t)
    torch.testing.assert_close(loss, per_pair.mean(0))
    loss.sum().backward()
    assert all(p.grad is not None for p in module.parameters()) and all(h.grad is not None for h in h_s)
    assert all(h.grad is None for h in h_t)
    torch.testing.assert_close(module.weight_norms(), torch.stack([p.weight.norm() for p in module.proj]))


def test_projection_shape_errors():
    module = hd.HiddenProjections([(0, 0)], 4, 6)
    with pytest.raises(ValueError, match="1 student states \\[N, 4\\] expected"):
        module([torch.zeros(3, 5)], [torch.zeros(3, 6)])
    with pytest.raises(ValueError, match="standardize=True"):
        module.update_statistics([torch.zeros(3, 6)])


def test_capture_vpmoe_blocks_and_the_final_pre_norm_output():
    torch.manual_seed(0)
    model = build_model(model_config("tiny_dense", "model.vocab_size=97"))
    ids = torch.randint(0, 97, (2, 9))
    blocks = hd.decoder_layers(model)
    assert blocks is model.layers
    inputs_of_next = {}
    handle = blocks[3].register_forward_pre_hook(lambda m, args: inputs_of_next.update(x=args[0]))
    with hd.capture_outputs([blocks[2], blocks[-1]]) as captured:
        hidden = model.body(ids).hidden
    handle.remove()
    assert torch.equal(captured[0], inputs_of_next["x"])  # block 2's output is block 3's input
    assert torch.equal(model.final_norm(captured[1]), hidden)  # the last block's output is the pre-norm state
    before = captured[1]
    model.body(ids[:, :5])
    assert captured[1] is before  # the hooks are gone after the block


def test_capture_hugging_face_blocks():
    model = random_gpt_oss(gpt_oss_config(97, num_hidden_layers=3, pad_token_id=0), seed=1)
    ids = torch.randint(0, 97, (1, 7))
    blocks = hd.decoder_layers(model)
    assert blocks is model.model.layers
    with torch.no_grad(), hd.capture_outputs(list(blocks)) as captured:
        out = model.model(ids, output_hidden_states=True)
    for i in range(2):
        assert torch.equal(captured[i], out.hidden_states[i + 1])
    assert torch.equal(model.model.norm(captured[2]), out.last_hidden_state)
    with pytest.raises(ValueError, match="no list of decoder layers"):
        hd.decoder_layers(torch.nn.Linear(2, 2))


def test_projections_fit_real_captured_states():
    """End to end on tiny models: capture, fit by least squares, and the fitted cosine term beats a random one."""
    torch.manual_seed(0)
    student = build_model(model_config("tiny_dense", "model.vocab_size=97"))
    teacher = random_gpt_oss(gpt_oss_config(97, num_hidden_layers=3, pad_token_id=0), seed=1)
    pairs = hd.layer_pairs("auto", len(student.layers), len(teacher.model.layers), count=2)
    ids = torch.randint(0, 97, (4, 16))
    with torch.no_grad():
        with hd.capture_outputs([hd.decoder_layers(student)[s] for s, _ in pairs]) as h_s:
            student.body(ids)
        with hd.capture_outputs([hd.decoder_layers(teacher)[t] for _, t in pairs]) as h_t:
            teacher.model(ids)
    h_s = [h.flatten(0, 1) for h in h_s]
    h_t = [h.flatten(0, 1) for h in h_t]
    module = hd.HiddenProjections(pairs, student.cfg.model.hidden_size, teacher.config.hidden_size,
                                  standardize=True)
    module.update_statistics(h_t)
    random_init = module(h_s, h_t).mean()
    module.fit_least_squares(h_s, h_t)
    assert module(h_s, h_t).mean() < random_init
    assert torch.isfinite(module(h_s, h_t)).all()
    assert F.cosine_similarity(module.proj[0](h_s[0]), module.target(0, h_t[0]), dim=-1).mean() > 0.5
