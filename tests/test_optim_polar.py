"""Polar Express: coefficients regenerated from the paper's construction, minimax optimality, singular-value band."""

import numpy as np
import pytest
import torch

from vpmoe.optim import polar as pe

# Published for (l=1e-3, 5 steps, cushion 0.02, safety 1 + 2e-2) by the paper's authors' code as used in
# modded-nanogpt / nanochat. An independent check that the construction here is the paper's.
PUBLISHED = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def test_stored_table_is_the_regenerated_one():
    regen = pe.polar_express_coefficients(l0=1e-3, steps=5, cushion=0.02, safety=1.02)
    assert len(regen) == len(pe.POLAR_EXPRESS_COEFFS) == 5
    np.testing.assert_allclose(np.array(pe.POLAR_EXPRESS_COEFFS), np.array(regen), rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.array(regen), np.array(PUBLISHED), rtol=1e-12, atol=0)


def test_construction_parameters_matter():
    """The table is sensitive to each construction parameter (so the comparison above can fail)."""
    base = np.array(pe.polar_express_coefficients())
    for kwargs in (dict(safety=1.01), dict(cushion=0.0), dict(l0=1e-4)):
        other = np.array(pe.polar_express_coefficients(**kwargs))
        assert np.max(np.abs(other - base) / np.abs(base)) > 1e-3, kwargs
    # safety factor: not applied to the last polynomial
    no_safety = pe.polar_express_coefficients(safety=1.0)
    assert no_safety[0] != pe.POLAR_EXPRESS_COEFFS[0]


@pytest.mark.parametrize("lo,hi", [(1e-3, 1.0), (0.02, 1.0), (0.1, 1.9), (0.4, 1.6), (0.85, 1.15)])
def test_minimax_quintic_equioscillates(lo, hi):
    """Best approximation of 1 on [lo, hi] by odd quintics: error equioscillates on 4 points, max error = E."""
    coeffs = pe.minimax_odd_quintic(lo, hi)
    x = np.linspace(lo, hi, 200001)
    err = 1.0 - pe.odd_quintic(coeffs, x)
    e_max = np.max(np.abs(err))
    q, r = pe._critical_points(*coeffs)
    assert lo < q < r < hi
    at = 1.0 - pe.odd_quintic(coeffs, np.array([lo, q, r, hi]))
    np.testing.assert_allclose(at, e_max * np.array([1, -1, 1, -1]), rtol=1e-9, atol=1e-13)
    # no other odd quintic does better: perturbing the coefficients raises the max error
    rng = np.random.default_rng(0)
    for _ in range(50):
        d = np.array(coeffs) * (1 + 1e-4 * rng.standard_normal(3))
        assert np.max(np.abs(1.0 - pe.odd_quintic(tuple(d), x))) >= e_max * (1 - 1e-9)


def test_scalar_band_contains_every_start():
    """Every starting value in [l0, 1] ends in [l_T, 2 - l_T]; the band is tight at l0."""
    coeffs = pe.POLAR_EXPRESS_COEFFS
    bands = pe.polar_express_band(coeffs)
    x = np.concatenate([np.geomspace(1e-3, 1.0, 100001), np.linspace(1e-3, 1.0, 100001)])
    for k, c in enumerate(coeffs):
        x = pe.odd_quintic(c, x)
        lo, hi = bands[k + 1]
        assert x.min() >= lo * (1 - 1e-12) and x.max() <= hi * (1 + 1e-12), k
    lo, hi = bands[-1]
    assert abs(x.min() - lo) < 1e-9  # reached at x0 = l0
    assert 0.85 < lo < 0.87 and abs(hi - (2 - lo)) < 1e-15


def _with_spectrum(rng, m, n, svals):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    return (u[:, :k] * svals) @ v[:, :k].T


def _expected_svals(g: np.ndarray) -> np.ndarray:
    s = np.linalg.svd(g, compute_uv=False)
    s = s / (np.sqrt(np.sum(s * s)) * pe.NORM_MARGIN + pe.NORM_EPS)
    for c in pe.POLAR_EXPRESS_COEFFS:
        s = pe.odd_quintic(c, s)
    return np.sort(s)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (48, 48), (3, 40, 96), (2, 96, 40), (1, 300)])
def test_matrix_iteration_band_float64(shape):
    """float64 run of the implementation: singular values equal the scalar composition and lie in the band."""
    rng = np.random.default_rng(sum(shape))
    m, n = shape[-2], shape[-1]
    batch = shape[:-2]
    mats = []
    for _ in range(int(np.prod(batch)) if batch else 1):
        k = min(m, n)
        # spread the normalized spectrum over [l0, 1/1.02]: log-uniform, ends pinned
        t = np.geomspace(1.0, 1e-3 * np.sqrt(k) * 0.999, k) if k > 1 else np.ones(1)
        mats.append(_with_spectrum(rng, m, n, t * rng.uniform(0.5, 5.0)))
    g = np.stack(mats).reshape(shape)
    out = pe.polar_express(torch.from_numpy(g), dtype=torch.float64).numpy()
    lo, hi = pe.polar_express_band(pe.POLAR_EXPRESS_COEFFS)[-1]
    for gi, oi in zip(g.reshape(-1, m, n), out.reshape(-1, m, n)):
        s0 = np.linalg.svd(gi, compute_uv=False)
        assert s0.min() / (np.linalg.norm(gi) * 1.02) >= 1e-3  # every start is inside [l0, 1]
        s = np.sort(np.linalg.svd(oi, compute_uv=False))
        np.testing.assert_allclose(s, _expected_svals(gi), rtol=1e-9, atol=1e-12)
        assert s.min() >= lo * (1 - 1e-9) and s.max() <= hi * (1 + 1e-9)


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (4, 24, 80), (4, 80, 24), (64, 64)])
def test_random_gaussian_band_float64_and_float32(shape):
    """Random Gaussian matrices (rectangular ones have every normalized singular value above l0)."""
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    lo, hi = pe.polar_express_band(pe.POLAR_EXPRESS_COEFFS)[-1]
    out64 = pe.polar_express(g, dtype=torch.float64)
    out32 = pe.polar_express(g.float())
    assert out32.dtype == torch.float32 and out32.shape == g.shape
    s64 = torch.linalg.svdvals(out64)
    s0 = torch.linalg.svdvals(g) / (torch.linalg.matrix_norm(g)[..., None] * 1.02)
    inside = s0 >= 1e-3
    if shape[-1] != shape[-2]:
        assert bool(inside.all())
    assert float(s64.max()) <= hi * (1 + 1e-9)
    assert float(s64[inside].min()) >= lo * (1 - 1e-9)
    rel = torch.linalg.norm(out32.double() - out64) / torch.linalg.norm(out64)
    assert float(rel) < 1e-5
    s32 = torch.linalg.svdvals(out32.double())
    assert float(s32[inside].min()) >= lo - 1e-4 and float(s32.max()) <= hi + 1e-4


def test_matches_textbook_iteration_and_bf16():
    """Same polynomial as X <- aX + b(XX^T)X + c(XX^T)^2 X after X / (||X||_F * 1.02 + 1e-6)."""
    torch.manual_seed(1)
    g = torch.randn(3, 40, 72, dtype=torch.float64)
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) * 1.02 + 1e-6)
    for a, b, c in pe.POLAR_EXPRESS_COEFFS:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    out = pe.polar_express(g, dtype=torch.float64)
    assert float((out - x).abs().max()) < 1e-12
    bf = pe.polar_express(g, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert float(torch.linalg.norm(bf.double() - x) / torch.linalg.norm(x)) < 5e-2


def test_batch_is_independent():
    """A batched call equals per-matrix calls, and scaling one matrix does not change the others."""
    torch.manual_seed(2)
    g = torch.randn(5, 24, 56)
    out = pe.polar_express(g)
    for i in range(5):
        torch.testing.assert_close(out[i], pe.polar_express(g[i]), rtol=1e-5, atol=1e-6)
    g2 = g.clone()
    g2[2] *= 1000.0
    out2 = pe.polar_express(g2)
    torch.testing.assert_close(out2[[0, 1, 3, 4]], out[[0, 1, 3, 4]], rtol=0, atol=0)


def test_zero_matrix_stays_zero():
    out = pe.polar_express(torch.zeros(2, 8, 16))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_every_step_count_matches_textbook(steps, shape):
    torch.manual_seed(steps)
    g = torch.randn(2, *shape, dtype=torch.float64)
    x = g.mT if shape[0] > shape[1] else g
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) * 1.02 + 1e-6)
    for a, b, c in pe.POLAR_EXPRESS_COEFFS[:steps]:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    if shape[0] > shape[1]:
        x = x.mT
    out = pe.polar_express(g, steps=steps, dtype=torch.float64)
    assert out.shape == g.shape
    assert float((out - x).abs().max()) < 1e-12
