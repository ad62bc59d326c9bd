"""Attention: sinks, GRAPE-M vs RoPE vs Hugging Face, GQA-as-TPA, ALiBi, window/document masks, compat vs HF Qwen3,
and the FlexAttention path's masks and sink handling (forward, on CPU)."""

import math

import pytest
import torch

from vpmoe.model import attention_ops
from vpmoe.model.attention import Attention, AttentionContext
from vpmoe.model.positions import (
    alibi_slopes,
    apply_rotary,
    grape_inv_freq,
    grape_log_freq_init,
    rope_inv_freq,
    rotary_cos_sin,
)
from vpmoe.testing.models import model_config

f64 = torch.float64


def explicit_sink_attention(q, k, v, sinks, allowed):
    """Softmax over [scores, s_h] (one extra column that carries no value), written out with explicit exps."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks[None, :, None, None].expand(*scores.shape[:-1], 1)
    full = torch.cat([scores, sink], dim=-1)
    weights = torch.exp(full - full.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return weights[..., :-1] @ v


def random_qkv(batch=2, heads=4, kv_heads=2, seq=24, dim=16, dtype=f64, grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=g, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def grads(out, tensors):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), tensors, retain_graph=True)


def causal(seq):
    return torch.ones(seq, seq, dtype=torch.bool).tril()


def test_sinks_lse_form_matches_explicit_extra_column_forward_and_gradients():
    q, k, v = random_qkv()
    sinks = torch.tensor([-1.0, 0.0, 0.7, 2.5], dtype=f64, requires_grad=True)
    allowed = causal(q.shape[2])
    expected = explicit_sink_attention(q, k, v, sinks, allowed)

    # The fused form the flex path uses: plain softmax output and its log-sum-exp, then sigmoid(lse - s).
    repeat = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(repeat, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    plain = torch.softmax(scores, -1) @ v.repeat_interleave(repeat, 1)
    fused = attention_ops.apply_sinks(plain, torch.logsumexp(scores, -1), sinks)
    torch.testing.assert_close(fused, expected, rtol=1e-8, atol=1e-8)
    for got, want in zip(grads(fused, (q, k, v, sinks)), grads(expected, (q, k, v, sinks))):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    assert grads(fused, (sinks,))[0].abs().min() > 0  # every sink gets a gradient


def test_reference_attention_with_sinks_matches_explicit_forward_and_gradients():
    q, k, v = random_qkv()
    sinks = torch.tensor([0.3, -2.0, 1.0, 0.0], dtype=f64, requires_grad=True)
    seq = q.shape[2]
    index = torch.arange(seq)
    doc = torch.zeros(q.shape[0], seq, dtype=torch.long)
    got = attention_ops.reference_attention(
        q, k, v, q_index=index, k_index=index, q_doc=doc, k_doc=doc, window=None, alibi=False, sinks=sinks,
        scale=1 / math.sqrt(q.shape[-1]))
    want = explicit_sink_attention(q, k, v, sinks, causal(seq))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    for a, b in zip(grads(got, (q, k, v, sinks)), grads(want, (q, k, v, sinks))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_alibi_adds_minus_slope_times_distance_and_slopes_are_spec():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    q, k, v = random_qkv(heads=8, kv_heads=2, grad=False)
    seq = q.shape[2]
    index = torch.arange(seq)
    doc = torch.zeros(q.shape[0], seq, dtype=torch.long)
    got = attention_ops.reference_attention(
        q, k, v, q_index=index, k_index=index, q_doc=doc, k_doc=doc, window=None, alibi=True, sinks=None,
        scale=1 / math.sqrt(q.shape[-1]))
    kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    for h in range(8):
        for i in range(seq):
            for j in range(seq):
                scores[:, h, i, j] -= 2.0 ** -(h + 1) * (i - j)
    want = torch.softmax(scores.masked_fill(~causal(seq), float("-inf")), -1) @ vv
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_grape_m_with_frozen_frequencies_is_rope_and_matches_hugging_face_qwen3():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    head_dim, base = 128, 1e6
    log_freq = grape_log_freq_init(head_dim, base, 16.0)
    assert log_freq.dtype == torch.float32 and log_freq.shape == (64,)
    inv_grape = grape_inv_freq(log_freq, 16.0)
    inv_rope = rope_inv_freq(head_dim, base)
    torch.testing.assert_close(inv_grape, inv_rope, rtol=2e-6, atol=0)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 8, head_dim, generator=g)
    k = torch.randn(2, 300, 2, head_dim, generator=g)
    position_ids = torch.stack([torch.arange(300), torch.arange(300).flip(0)])  # any positions, per row
    cos, sin = rotary_cos_sin(position_ids, inv_grape)
    ours_q, ours_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    hf_config = Qwen3Config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                            rope_theta=base, max_position_embeddings=4096)
    hf_cos, hf_sin = Qwen3RotaryEmbedding(hf_config)(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    # fp32 angles up to 300 rad: the two frequency roundings differ by ~1 ulp.
    torch.testing.assert_close(ours_q, hf_q.transpose(1, 2), rtol=0, atol=2e-4)
    torch.testing.assert_close(ours_k, hf_k.transpose(1, 2), rtol=0, atol=2e-4)
    # Our compat RoPE reproduces HF's frequencies bit for bit.
    rope_cos, rope_sin = rotary_cos_sin(position_ids, inv_rope)
    torch.testing.assert_close(rope_cos, hf_cos, rtol=0, atol=0)
    torch.testing.assert_close(rope_sin, hf_sin, rtol=0, atol=0)


def test_rotate_half_pairs_dims_i_and_i_plus_half():
    x = torch.zeros(1, 1, 1, 8, dtype=f64)
    x[..., 1] = 1.0  # dim 1 pairs with dim 5
    inv = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=f64)
    cos, sin = rotary_cos_sin(torch.tensor([[math.pi / 2]], dtype=f64), inv)
    out = apply_rotary(x, cos, sin)
    expected = torch.zeros(8, dtype=f64)
    expected[5] = 1.0  # x1*cos - x2*sin at i, x2*cos + x1*sin at i + 4
    torch.testing.assert_close(out.flatten(), expected, atol=1e-12, rtol=0)


def _context(seq, batch=1, doc_ids=None, position_ids=None, kernel="reference", cfg=None):
    doc_ids = torch.zeros(batch, seq, dtype=torch.long) if doc_ids is None else doc_ids
    position_ids = torch.arange(seq).expand(batch, seq) if position_ids is None else position_ids
    ctx = AttentionContext(position_ids=position_ids, doc_ids=doc_ids, token_index=torch.arange(seq), kernel=kernel)
    if cfg is not None and not cfg.real:
        ctx.rope = rotary_cos_sin(position_ids, rope_inv_freq(cfg.attention.head_dim, cfg.attention.rope_base))
    return ctx


def _layer(cfg, layer):
    torch.manual_seed(layer)
    attn = Attention(cfg, layer).double()
    with torch.no_grad():  # random biases, sinks and gains so nothing hides behind zeros or ones
        for name, p in attn.named_parameters():
            if name != "grape_log_freq":
                p.add_(torch.randn_like(p) * 0.1)
    return attn


def test_gqa_embeds_exactly_into_tpa():
    cfg = model_config("vpDense0-5_28.real", "model.hidden_size=64", "attention.head_dim=16")
    attn = _layer(cfg, 0)
    assert attn.kind == "local"
    rank = cfg.attention.tpa_kv_rank
    kv_dim = cfg.attention.n_kv_heads * cfg.attention.head_dim
    g = torch.Generator().manual_seed(3)
    gqa_k = torch.nn.Linear(64, kv_dim).double()
    gqa_v = torch.nn.Linear(64, kv_dim).double()
    with torch.no_grad():
        for a, b, bias, gqa in ((attn.k_a, attn.k_b, attn.k_bias, gqa_k), (attn.v_a, attn.v_b, attn.v_bias, gqa_v)):
            a.weight.zero_()
            a.bias.copy_((rank * torch.eye(cfg.attention.n_kv_heads, rank)).flatten())
            b.weight.copy_(gqa.weight)
            bias.copy_(gqa.bias)
    x = torch.randn(2, 10, 64, generator=g, dtype=f64)
    # The construction is exact (A-bias R * onehot, B = the GQA weight); the products run through differently
    # shaped matmuls, so the results agree to float64 rounding, not bit for bit.
    assert torch.equal(attn.k_b.weight, gqa_k.weight) and torch.equal(attn.v_b.weight, gqa_v.weight)
    _, k, v = attn.project(x)
    torch.testing.assert_close(k, gqa_k(x).view(2, 10, 2, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, gqa_v(x).view(2, 10, 2, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [8, 128])
def test_local_layer_never_sees_beyond_window(window):
    cfg = model_config("tiny_real", f"attention.window={window}")
    attn = _layer(cfg, 0)
    seq = window + 40
    g = torch.Generator().manual_seed(window)
    x = torch.randn(1, seq, cfg.model.hidden_size, generator=g, dtype=f64)
    base, _ = attn(x, _context(seq))
    j = 5
    x2 = x.clone()
    x2[0, j] += 1.0
    out, _ = attn(x2, _context(seq))
    changed = (out - base).abs().amax(-1)[0] > 0
    assert not changed[:j].any()  # causal
    assert changed[j: j + window].all()  # inside the window (its own position included)
    assert not changed[j + window:].any()  # i - window < j is false: unseen


@pytest.mark.parametrize("layer", [0, 3])  # a local and a global layer
def test_attention_never_crosses_a_document_boundary(layer):
    cfg = model_config("tiny_real")
    attn = _layer(cfg, layer)
    seq = 30
    doc_ids = torch.tensor([[0] * 12 + [1] * 10 + [2] * 8])
    g = torch.Generator().manual_seed(layer)
    x = torch.randn(1, seq, cfg.model.hidden_size, generator=g, dtype=f64)
    base, _ = attn(x, _context(seq, doc_ids=doc_ids))
    x2 = x.clone()
    x2[0, 14] += 1.0  # inside document 1
    out, _ = attn(x2, _context(seq, doc_ids=doc_ids))
    changed = (out - base).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False] * 14 + [True] * 8 + [False] * 8


def test_global_layer_is_nope_and_local_layer_is_not():
    cfg = model_config("tiny_real")
    seq = 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq, cfg.model.hidden_size, generator=g, dtype=f64)
    shuffled = torch.randperm(100, generator=g)[:seq][None]
    for layer, position_free in ((3, True), (0, False)):
        attn = _layer(cfg, layer)
        a, _ = attn(x, _context(seq))
        b, _ = attn(x, _context(seq, position_ids=shuffled))
        assert torch.equal(a, b) == position_free
    assert not hasattr(_layer(cfg, 3), "grape_log_freq")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 3, 8), (2, 2, 32), (8, 1, 16)])
def test_compat_attention_matches_hugging_face_qwen3(heads, kv_heads, head_dim):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    hidden = 48
    cfg = model_config("tiny_compat", f"model.hidden_size={hidden}", f"attention.n_heads={heads}",
                       f"attention.n_kv_heads={kv_heads}", f"attention.head_dim={head_dim}")
    hf_config = Qwen3Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=head_dim, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=False,
                            max_position_embeddings=256)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen3Attention(hf_config, layer_idx=0).eval()
    with torch.no_grad():
        hf.q_norm.weight.uniform_(0.5, 1.5)
        hf.k_norm.weight.uniform_(0.5, 1.5)
    ours = Attention(cfg, 0)
    assert ours.kind == "full" and ours.sinks is None
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected

    seq = 40
    x = torch.randn(2, seq, hidden)
    position_ids = torch.arange(seq).expand(2, seq)
    cos, sin = Qwen3RotaryEmbedding(hf_config)(x, position_ids)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    want, _ = hf(x, position_embeddings=(cos, sin), attention_mask=mask)
    got, _ = ours(x, _context(seq, batch=2, cfg=cfg))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _flex_inputs(seq, batch=2):
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(batch, 8, seq, 32, generator=g)
    k = torch.randn(batch, 2, seq, 32, generator=g)
    v = torch.randn(batch, 2, seq, 32, generator=g)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    doc_ids[0, 100:] = 1
    doc_ids[0, 250:] = 2
    doc_ids[1, 40:] = 7
    return q, k, v, doc_ids


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window,alibi", [(None, False), (None, True), (128, False), (32, True)])
def test_flex_path_masks_alibi_and_sinks_match_reference_forward_on_cpu(window, alibi):
    """The fast path's mask_mod/score_mod/sink logic, run by FlexAttention's eager (CPU) implementation."""
    seq = 300
    q, k, v, doc_ids = _flex_inputs(seq)
    sinks = torch.linspace(-2, 2, 8)
    index = torch.arange(seq)
    with torch.no_grad():
        block_mask = attention_ops.document_block_mask(doc_ids, window)
        got = attention_ops.flex_attention(q, k, v, block_mask=block_mask, alibi=alibi, sinks=sinks,
                                           scale=32**-0.5, compiled=False)
        want = attention_ops.reference_attention(
            q.double(), k.double(), v.double(), q_index=index, k_index=index, q_doc=doc_ids, k_doc=doc_ids,
            window=window, alibi=alibi, sinks=sinks.double(), scale=32**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_grape_frequency_gradient_equals_a_float64_finite_difference():
    cfg = model_config("tiny_real")
    attn = _layer(cfg, 0)
    assert attn.kind == "local"
    x = torch.randn(1, 12, cfg.model.hidden_size, dtype=f64, generator=torch.Generator().manual_seed(1))

    def loss():
        out, _ = attn(x, _context(12))
        return out.square().sum()

    (grad,) = torch.autograd.grad(loss(), attn.grape_log_freq)
    h, numeric = 1e-5, torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(len(numeric)):
            attn.grape_log_freq[i] += h
            up = loss()
            attn.grape_log_freq[i] -= 2 * h
            down = loss()
            attn.grape_log_freq[i] += h
            numeric[i] = (up - down) / (2 * h)
    assert grad.abs().min() > 0
    # central difference: truncation O(h^2) and rounding O(1e-16 / h), both far below 1e-6 of the largest entry
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-6 * float(numeric.abs().max()))


@pytest.mark.parametrize("mix", [0.3, 0.85])
def test_value_residual_mixing_is_the_interpolation_of_the_values(mix):
    """Attention is affine in V (the output bias enters with weight (1 - lambda) + lambda = 1), so mixing the
    values with lambda gives the same interpolation of the outputs at lambda = 0 and 1."""
    cfg = model_config("tiny_real")
    attn = _layer(cfg, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 10, cfg.model.hidden_size, dtype=f64, generator=g)
    v_first = torch.randn(1, 10, cfg.attention.n_kv_heads, cfg.attention.head_dim, dtype=f64, generator=g)
    with torch.no_grad():
        assert attn(x, _context(10))[1].shape == v_first.shape  # this layer's own V, as the model passes layer 0's
        outputs = {lam: attn(x, _context(10), v_first=v_first, value_mix=torch.tensor(lam, dtype=f64))[0]
                   for lam in (0.0, 1.0, mix)}
    want = (1 - mix) * outputs[0.0] + mix * outputs[1.0]
    torch.testing.assert_close(outputs[mix], want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert not torch.allclose(outputs[0.0], outputs[1.0])
