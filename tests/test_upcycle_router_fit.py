"""Step 5's optional router fit: with noisy experts, the fitted router makes the MoE layer reproduce the dense FFN
better than the random rows, measured against float64 forwards of the layers themselves."""

import copy

import numpy as np
import pytest
import torch

from vpmoe.model.transformer import build_model
from vpmoe.testing.models import model_config
from vpmoe.upcycle import granular
from vpmoe.upcycle.drift import CalibrationRow

VOCAB = 64


def _rows(n, seq, seed):
    g = np.random.default_rng(seed)
    return [CalibrationRow(g.integers(0, VOCAB, seq).astype(np.int32), np.ones(seq, np.uint8)) for _ in range(n)]


def _reference_error(dense, moe_model, layer, rows):
    """|moe_layer(x) - dense_ffn(x)| / |dense_ffn(x)|, x the dense model's FFN inputs (hooked), the norms in float64.
    The layers run in fp32 as in the fit: in float64 a token whose two best groups nearly tie may route otherwise."""
    xs = []
    hook = dense.layers[layer].mlp.register_forward_hook(lambda m, a, o: xs.append(a[0]))
    with torch.no_grad():
        for row in rows:
            dense(torch.from_numpy(row.tokens.astype(np.int64))[None])
    hook.remove()
    x = torch.cat(xs, 1)
    with torch.no_grad():
        want, got = dense.layers[layer].mlp(x).double(), moe_model.layers[layer].mlp(x)[0].double()
    return float((got - want).norm() / want.norm())


def test_router_fit_reduces_the_moe_vs_dense_error_with_noisy_experts():
    torch.manual_seed(0)
    dense = build_model(model_config("tiny_dense", f"model.vocab_size={VOCAB}", "model.n_layers=4"))
    cfg = model_config("tiny_moe", f"model.vocab_size={VOCAB}", "model.n_layers=4", "moe.n_experts=64")
    moe, details = granular.convert(dense, cfg, seed=0, noise=0.5)
    random_rows = copy.deepcopy(moe)
    fit, held = _rows(8, 48, 1), _rows(3, 48, 2)
    report = granular.fit_router(dense, moe, fit, held, details["slices"], steps=150, lr=0.05)
    assert sorted(int(k) for k in report["layers"]) == cfg.moe_layers
    for layer in cfg.moe_layers:
        entry = report["layers"][str(layer)]
        before = _reference_error(dense, random_rows, layer, held)
        after = _reference_error(dense, moe, layer, held)
        assert entry["moe_vs_dense_rel_err"]["random"] == pytest.approx(before, rel=1e-5)
        assert entry["kept"] == "fit" and entry["moe_vs_dense_rel_err"]["fit"] == pytest.approx(after, rel=1e-5)
        assert after < 0.95 * before, (layer, before, after)
        w = moe.layers[layer].mlp.router.weight
        assert torch.equal(w[0::4], w[3::4])  # still one row per virtual group
        experts = moe.layers[layer].mlp.experts
        assert torch.equal(experts.up, random_rows.layers[layer].mlp.experts.up)  # experts untouched
