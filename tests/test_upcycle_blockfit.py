"""Block-wise morph (step 3 with calibration data) and the activation-aware Q init, against float64 references."""

import copy

import numpy as np
import pytest
import torch

from vpmoe.model.transformer import build_model
from vpmoe.testing.models import model_config
from vpmoe.upcycle import blockfit, morph
from vpmoe.upcycle.drift import CalibrationRow

VOCAB = 64
GEOMETRY = ["model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2", "attention.head_dim=8",
            f"model.vocab_size={VOCAB}"]


def _correlated(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ mix


def _tpa_weight(a_bias, b, n_heads, rank):
    """W' [n_heads * hd, D] of TPA factors with A weight 0: head h = (1/R) sum_r A[h, r] B_r."""
    a = a_bias.double().view(n_heads, rank)
    bs = b.double().view(rank, -1, b.shape[1])
    return torch.einsum("hr,rkd->hkd", a, bs).reshape(-1, b.shape[1]) / rank


def test_whitened_svd_is_the_best_rank_r_q_on_correlated_activations():
    n_heads, hd, dim, rank = 8, 4, 16, 2
    torch.manual_seed(0)
    weight = torch.randn(n_heads * hd, dim)
    x = _correlated(400, dim, seed=1)

    def output_error(a_bias, b):
        approx = _tpa_weight(a_bias, b, n_heads, rank)
        return float((x @ (weight.double() - approx).T).norm() / (x @ weight.double().T).norm())

    plain = output_error(*morph.svd_heads(weight, n_heads, rank)[:2])
    a_bias, b, reported = morph.svd_heads_whitened(weight, n_heads, rank, x.T @ x, ridge=0.0)
    whitened = output_error(a_bias, b)
    assert whitened < 0.9 * plain
    # Eckart-Young in numpy float64: the optimum is the tail of the singular values of the whitened heads matrix.
    chol = np.linalg.cholesky(x.numpy().T @ x.numpy())
    m = (weight.double().numpy().reshape(n_heads, hd, dim) @ chol).reshape(n_heads, hd * dim)
    s = np.linalg.svd(m, compute_uv=False)
    optimum = float(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()))
    assert reported == pytest.approx(optimum, rel=1e-10)
    assert whitened == pytest.approx(optimum, rel=1e-5)  # fp32 factors: ~1e-7 relative rounding


def _compat_and_mapped():
    compat = build_model(model_config("tiny_compat", *GEOMETRY))
    with torch.no_grad():
        for name, p in compat.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    cfg = model_config("tiny_real", *GEOMETRY, "attention.tpa_q_rank=2", "attention.window=32")
    real, _ = morph.convert(compat, cfg)
    return compat, real


def _rows(n, seq, seed):
    g = np.random.default_rng(seed)
    return [CalibrationRow(g.integers(0, VOCAB, seq).astype(np.int32), np.ones(seq, np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    compat, mapped = _compat_and_mapped()
    real = copy.deepcopy(mapped)
    fit, held = _rows(16, 48, seed=1), _rows(3, 48, seed=2)
    report = blockfit.fit_blocks(compat, real, fit, held, blockfit.FitSettings(steps=80, lr=2e-3, rows_per_step=4))
    return compat, mapped, real, held, report


def _reference_errors(compat, real, rows):
    """Per block |real_block(x) - compat_block(x)| / |compat_block(x) - x| in float64 through the models' own
    forward: compat block inputs captured by hooks, then fed to the real blocks by pre-hooks (v_first is the real
    layer 0's own, from the embeddings, as the real model computes it)."""
    compat, real = copy.deepcopy(compat).double(), copy.deepcopy(real).double()
    n = len(compat.layers)
    num, den = [0.0] * n, [0.0] * n
    for row in rows:
        ids = torch.from_numpy(row.tokens.astype(np.int64))[None]
        ins, outs, real_outs = {}, {}, {}
        def capture(module, args, out):
            ins[module.layer], outs[module.layer] = args[0], out[0]

        hooks = [b.register_forward_hook(capture) for b in compat.layers]
        with torch.no_grad():
            compat(ids)
        for h in hooks:
            h.remove()
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: (ins[i], *a[1:])) for i, b in enumerate(real.layers)]
        hooks += [b.register_forward_hook(lambda m, a, o, i=i: real_outs.__setitem__(i, o[0]))
                  for i, b in enumerate(real.layers)]
        with torch.no_grad():
            real(ids)
        for h in hooks:
            h.remove()
        for i in range(n):
            num[i] += float((real_outs[i] - outs[i]).square().sum())
            den[i] += float((outs[i] - ins[i]).square().sum())
    return [(a / b) ** 0.5 for a, b in zip(num, den)]


def test_blockwise_fit_lowers_every_blocks_held_out_error(fitted):
    compat, mapped, real, held, report = fitted
    before = _reference_errors(compat, mapped, held)
    after = _reference_errors(compat, real, held)
    for i, entry in enumerate(report["blocks"]):
        err = entry["rel_err"]
        # the fit's own fp32 measurement agrees with the float64 reference through the models' forward
        assert entry["kept"] == "fit", entry
        assert err["mapped"] == pytest.approx(before[i], rel=1e-4)
        assert err["fit"] == pytest.approx(after[i], rel=1e-4)
        assert after[i] < 0.95 * before[i], (i, before[i], after[i])
    kinds = [e["kind"] for e in report["blocks"]]
    assert kinds == ["local", "local", "local", "global"]
    assert all("q_whitened_relative_error" in e for e in report["blocks"] if e["kind"] == "local")


def test_blockwise_fit_trains_only_what_the_morph_introduced(fitted):
    compat, mapped, real, held, report = fitted
    mapped_sd, real_sd = mapped.state_dict(), real.state_dict()
    changed = {k for k in real_sd if not torch.equal(real_sd[k], mapped_sd[k])}
    assert changed, "nothing was fitted"
    frozen = ("norm", "o_proj.weight", "mlp.up.weight", "mlp.down.weight", "embed", "head", "v_proj.weight")
    assert not [k for k in changed if any(f in k for f in frozen)]
    assert {"layers.3.attn.q_proj.weight", "layers.1.attn.q_b.weight", "layers.2.attn.sinks",
            "layers.2.value_residual_logit"} <= changed
    assert set(report["blocks"][3]["trained"]) >= {"attn.q_proj.weight", "attn.k_proj.weight", "attn.sinks"}


def test_a_block_that_the_fit_cannot_improve_keeps_its_mapped_weights():
    torch.manual_seed(0)
    compat, mapped = _compat_and_mapped()
    real = copy.deepcopy(mapped)
    settings = blockfit.FitSettings(steps=3, lr=10.0, rows_per_step=1, q_init="svd")  # a step that can only hurt
    report = blockfit.fit_blocks(compat, real, _rows(2, 30, 1), _rows(2, 30, 2), settings)
    for entry in report["blocks"]:
        assert entry["rel_err"]["init"] == entry["rel_err"]["mapped"]  # q_init "svd": the mapping's own Q
        if entry["kept"] == "mapped":
            layer = entry["layer"]
            for k, v in mapped.layers[layer].state_dict().items():
                assert torch.equal(real.layers[layer].state_dict()[k], v)
    assert any(e["kept"] == "mapped" for e in report["blocks"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blockwise_fit_on_the_gpu_measures_what_the_cpu_does():
    torch.manual_seed(0)
    compat, mapped = _compat_and_mapped()
    fit, held = _rows(4, 48, seed=1), _rows(2, 48, seed=2)
    settings = blockfit.FitSettings(steps=5, lr=2e-3, rows_per_step=2)
    cpu = blockfit.fit_blocks(compat, copy.deepcopy(mapped), fit, held, settings)
    gpu = blockfit.fit_blocks(copy.deepcopy(compat).cuda(), copy.deepcopy(mapped).cuda(), fit, held, settings)
    for a, b in zip(cpu["blocks"], gpu["blocks"]):
        assert b["rel_err"]["mapped"] == pytest.approx(a["rel_err"]["mapped"], rel=1e-3)  # TF32-free fp32 kernels


def _max_relative_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-300)) for k in a)


def test_parallel_block_fits_give_the_serial_fit():
    """morph.workers = 2 (layers 1.. fitted in spawned processes) gives the tensors and per-block report of the
    serial fit: float64 throughout, so that the last-bit differences a process's own vectorized sums may make stay
    far below the tolerance."""
    torch.manual_seed(0)
    compat, mapped = _compat_and_mapped()
    compat, mapped = compat.double(), mapped.double()
    fit, held = _rows(4, 48, seed=1), _rows(2, 48, seed=2)
    settings = blockfit.FitSettings(steps=5, lr=3e-4, rows_per_step=2)
    serial, parallel = copy.deepcopy(mapped), copy.deepcopy(mapped)
    want = blockfit.fit_blocks(compat, serial, fit, held, settings)
    seen = []
    got = blockfit.fit_blocks(compat, parallel, fit, held, settings, progress=lambda i, e: seen.append(i), workers=2)
    assert seen == [0, 1, 2, 3]
    assert (want.pop("workers"), got.pop("workers")) == (1, 2)
    assert {e["kept"] for e in got["blocks"][1:]} == {"fit"}  # the workers' fitted weights were taken
    assert [e["layer"] for e in got["blocks"]] == [0, 1, 2, 3]
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want if k != "blocks")
    for a, b in zip(want["blocks"], got["blocks"]):
        assert {k: v for k, v in a.items() if k not in ("rel_err", "q_whitened_relative_error")} == \
               {k: v for k, v in b.items() if k not in ("rel_err", "q_whitened_relative_error")}
        for k in a["rel_err"]:
            assert b["rel_err"][k] == pytest.approx(a["rel_err"][k], rel=1e-10, abs=0)
        if "q_whitened_relative_error" in a:
            assert b["q_whitened_relative_error"] == pytest.approx(a["q_whitened_relative_error"], rel=1e-10, abs=0)
    assert _max_relative_difference(serial.state_dict(), parallel.state_dict()) <= 1e-10
    changed = {k.split(".")[1] for k, t in parallel.state_dict().items() if not torch.equal(t, mapped.state_dict()[k])}
    assert changed == {"1", "2", "3"}
