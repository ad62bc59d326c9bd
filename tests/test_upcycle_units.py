"""The conversion rules one by one, on single layers, against Hugging Face Qwen3 and our own modules."""

import math

import pytest
import torch

from vpmoe.errors import UserError
from vpmoe.model.attention import Attention, AttentionContext
from vpmoe.model.moe import DenseFFN
from vpmoe.model.positions import rope_inv_freq, rotary_cos_sin
from vpmoe.model.transformer import build_model
from vpmoe.testing.models import model_config
from vpmoe.upcycle import expand, granular, morph, surgery

f64 = torch.float64


def _ctx(seq, cfg=None):
    pos = torch.arange(seq)[None]
    ctx = AttentionContext(position_ids=pos, doc_ids=torch.zeros(1, seq, dtype=torch.long),
                           token_index=torch.arange(seq), kernel="reference")
    if cfg is not None and not cfg.real:
        ctx.rope = rotary_cos_sin(pos, rope_inv_freq(cfg.attention.head_dim, cfg.attention.rope_base))
    return ctx


def _hf_attention(heads, kv_heads, head_dim, hidden, seed=0):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = Qwen3Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=512)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = Qwen3Attention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    return attn, config


def _hf_forward(attn, config, x):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    seq = x.shape[1]
    cos, sin = Qwen3RotaryEmbedding(config)(x, torch.arange(seq)[None])
    mask = torch.full((seq, seq), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    return attn(x, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)), attention_mask=mask)[0]


def _pooled_attention(hf_attn, heads, kv_heads, head_dim, hidden):
    cfg = model_config("tiny_compat", f"model.hidden_size={hidden}", f"attention.n_heads={heads // 2}",
                       f"attention.n_kv_heads={kv_heads // 4}", f"attention.head_dim={head_dim}")
    ours = Attention(cfg, 0).double()
    sd = hf_attn.state_dict()
    with torch.no_grad():
        ours.q_proj.weight.copy_(surgery.pool_rows(sd["q_proj.weight"], heads, heads // 2, head_dim))
        ours.k_proj.weight.copy_(surgery.pool_rows(sd["k_proj.weight"], kv_heads, kv_heads // 4, head_dim))
        ours.v_proj.weight.copy_(surgery.pool_rows(sd["v_proj.weight"], kv_heads, kv_heads // 4, head_dim))
        ours.o_proj.weight.copy_(surgery.sum_cols(sd["o_proj.weight"], heads, heads // 2, head_dim))
        ours.q_norm.weight.copy_(sd["q_norm.weight"])
        ours.k_norm.weight.copy_(sd["k_norm.weight"])
    return ours, cfg


def test_head_pooling_keeps_the_output_of_coherent_heads_exactly():
    """The o-proj rule: when the merged heads agree (duplicated q heads in pairs, KV heads in fours), the pooled
    8q/2kv attention reproduces the 16q/8kv donor's output exactly (sum of o blocks, not their mean)."""
    heads, kv_heads, hd, hidden = 16, 8, 8, 32
    hf_attn, config = _hf_attention(heads, kv_heads, hd, hidden)
    with torch.no_grad():
        q = hf_attn.q_proj.weight.view(heads, hd, hidden)
        q[1::2] = q[0::2]  # q heads 2i and 2i+1 identical
        for proj in (hf_attn.k_proj, hf_attn.v_proj):
            w = proj.weight.view(kv_heads, hd, hidden)
            w[:] = w[0::4].repeat_interleave(4, 0)  # kv heads 4j..4j+3 identical
    ours, cfg = _pooled_attention(hf_attn, heads, kv_heads, hd, hidden)
    x = torch.randn(2, 24, hidden, dtype=f64)
    with torch.no_grad():
        want = _hf_forward(hf_attn, config, x)
        got, _ = ours(x, _ctx(24, cfg))
    # float64 math; both sides build RoPE angles from fp32 frequencies, rounded a little differently
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    # Averaging the o blocks instead would halve the output of such heads.
    with torch.no_grad():
        ours.o_proj.weight.mul_(0.5)
        halved, _ = ours(x, _ctx(24, cfg))
    torch.testing.assert_close(halved, want / 2, rtol=0, atol=1e-6)


def test_head_pooling_of_generic_heads_is_lossy_but_same_scale():
    heads, kv_heads, hd, hidden = 16, 8, 8, 32
    hf_attn, config = _hf_attention(heads, kv_heads, hd, hidden, seed=1)
    ours, cfg = _pooled_attention(hf_attn, heads, kv_heads, hd, hidden)
    x = torch.randn(1, 24, hidden, dtype=f64)
    with torch.no_grad():
        want = _hf_forward(hf_attn, config, x)
        got, _ = ours(x, _ctx(24, cfg))
    assert not torch.allclose(got, want, atol=1e-6)
    ratio = float(got.norm() / want.norm())
    assert 0.2 < ratio < 5  # pooled, not exploded or vanished


def test_pooling_maps_adjacent_heads_and_gqa_groups_stay_consistent():
    w = torch.arange(16 * 2 * 3, dtype=f64).view(16 * 2, 3)  # 16 heads of dim 2
    pooled = surgery.pool_rows(w, 16, 8, 2)
    torch.testing.assert_close(pooled.view(8, 2, 3)[3], (w.view(16, 2, 3)[6] + w.view(16, 2, 3)[7]) / 2)
    o = torch.arange(3 * 32, dtype=f64).view(3, 32)
    torch.testing.assert_close(surgery.sum_cols(o, 16, 8, 2).view(3, 8, 2)[:, 5], o.view(3, 16, 2)[:, 10] +
                               o.view(3, 16, 2)[:, 11])
    facts = {"hidden": 64, "layers": 4, "head_dim": 16, "vocab": 201088, "heads": 16, "kv_heads": 8,
             "intermediate": 96, "rope_theta": 1e6}
    cfg = model_config("tiny_compat", "attention.n_heads=8", "attention.n_kv_heads=2")
    surgery.check_geometry(facts, cfg)  # adjacent pooling: consistent
    with pytest.raises(UserError, match="pool"):
        surgery.check_geometry({**facts, "heads": 12}, cfg)
    with pytest.raises(UserError, match="dense_width"):
        surgery.check_geometry({**facts, "intermediate": 16}, cfg)
    with pytest.raises(UserError, match="RoPE"):
        surgery.check_geometry({**facts, "rope_theta": 1e4}, cfg)


def test_method_a_keeps_the_largest_down_columns_in_order():
    down = torch.zeros(4, 10)
    down[:, [7, 2, 5]] = torch.tensor([3.0, 2.0, 1.0])
    down[:, 9] = 0.5
    assert surgery.select_units(down, 3).tolist() == [2, 5, 7]
    assert surgery.select_units(torch.ones(4, 6), 2).tolist() == [0, 1]  # ties: lower index first


def _compat_and_real(q_rank):
    cfg_c = model_config("tiny_compat", "model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2",
                         "attention.head_dim=8", "model.vocab_size=64")
    cfg_r = model_config("tiny_real", "model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2",
                         "attention.head_dim=8", "model.vocab_size=64", f"attention.tpa_q_rank={q_rank}",
                         "attention.window=4096")
    torch.manual_seed(0)
    compat = build_model(cfg_c)
    with torch.no_grad():
        for name, p in compat.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return compat, cfg_r


def test_morph_local_layer_is_exact_with_full_q_rank_frozen_grape_and_no_sink():
    """GRAPE-M from RoPE and GQA -> TPA are exact: with R_q = n_heads, a window longer than the text and a sink at
    -inf-like -1e4, a local layer computes what the compat layer did."""
    compat, cfg_r = _compat_and_real(q_rank=8)
    real, details = morph.convert(compat, cfg_r, sink_init=-1e4)
    assert details["q_svd_relative_error"]["0"] < 1e-6
    x = torch.randn(2, 40, 64)
    c_attn, r_attn = compat.layers[0].attn, real.layers[0].attn
    assert r_attn.kind == "local"
    q_c, k_c, v_c = c_attn.project(x)
    q_r, k_r, v_r = r_attn.project(x)
    # the A-bias construction is exact in the weights; the products take other matmul shapes (a few fp32 ulps)
    for part in ("k", "v"):
        assert torch.equal(getattr(r_attn, f"{part}_b").weight, getattr(c_attn, f"{part}_proj").weight)
        assert not getattr(r_attn, f"{part}_a").weight.any()
    torch.testing.assert_close(k_r, k_c, rtol=4 * 2.0**-23, atol=4 * 2.0**-23 * k_c.abs().max().item())
    torch.testing.assert_close(v_r, v_c, rtol=4 * 2.0**-23, atol=4 * 2.0**-23 * v_c.abs().max().item())
    torch.testing.assert_close(q_r, q_c, rtol=1e-5, atol=1e-5)
    want, _ = c_attn(x, _ctx(40, compat.cfg))
    got, _ = r_attn(x, _ctx(40, cfg_r))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_morph_q_svd_error_is_the_truncation_error_and_biases_start_at_zero():
    compat, cfg_r = _compat_and_real(q_rank=4)
    real, details = morph.convert(compat, cfg_r)
    w = compat.layers[1].attn.q_proj.weight.detach().double().view(8, -1)
    s = torch.linalg.svdvals(w)
    want = math.sqrt(float(s[4:].square().sum() / s.square().sum()))
    assert details["q_svd_relative_error"]["1"] == pytest.approx(want, rel=1e-6)
    x = torch.randn(1, 5, 64)
    q_c, _, _ = compat.layers[1].attn.project(x)
    q_r, _, _ = real.layers[1].attn.project(x)
    err = float((q_r - q_c).detach().norm() / q_c.detach().norm())
    assert 0 < err < 1
    for name, p in real.named_parameters():
        if name.endswith(("o_proj.bias", "q_bias", "k_bias", "v_bias", "up.bias", "down.bias")):
            assert not p.any(), name
        if name.endswith("sinks"):
            assert torch.all(p == -10.0)
        if name.endswith("value_residual_logit"):
            assert float(p.detach()) == -10.0
    assert real.layers[3].attn.kind == "global"
    assert torch.equal(real.layers[3].attn.q_proj.weight, compat.layers[3].attn.q_proj.weight)


def test_morph_refuses_mismatched_geometry():
    compat, cfg_r = _compat_and_real(q_rank=4)
    other = model_config("tiny_real", "model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2",
                         "attention.head_dim=8", "model.vocab_size=128")
    with pytest.raises(UserError, match="vocab_size"):
        morph.convert(compat, other)
    low = model_config("tiny_real", "model.n_layers=4", "attention.n_heads=8", "attention.n_kv_heads=2",
                       "attention.head_dim=8", "model.vocab_size=64", "attention.tpa_kv_rank=1")
    with pytest.raises(UserError, match="tpa_kv_rank"):
        morph.convert(compat, low)


def test_depth_expansion_28_to_80_preserves_order_and_kinds():
    copy_of, original = expand.layer_mapping(28, 80, 4)
    originals = [o for o in original if o is not None]
    assert originals == list(range(28))
    assert original[0] == 0 and original[79] == 27
    assert sum(o is None for o in original) == 52
    for t, s in enumerate(copy_of):
        assert ((t + 1) % 4 == 0) == ((s + 1) % 4 == 0)
    assert sum((t + 1) % 4 == 0 for t in range(80)) == 20
    # each new layer copies the nearest original of the same kind (the earlier one on a tie)
    position = {o: t for t, o in enumerate(original) if o is not None}
    for t, s in enumerate(copy_of):
        kind = (t + 1) % 4 == 0
        candidates = [position[o] for o in range(28) if ((o + 1) % 4 == 0) == kind]
        best = min(candidates, key=lambda u: (abs(u - t), u))
        assert position[s] == best
    assert copy_of[4] == 2 and copy_of[5] == 2  # block 1 is new: its locals copy layer 2 (nearest), not layer 0
    with pytest.raises(UserError, match="whole blocks"):
        expand.layer_mapping(28, 81, 4)


def test_granular_moe_layer_equals_the_dense_ffn_for_any_input():
    dense_cfg = model_config("tiny_dense", "model.vocab_size=64", "model.n_layers=2")
    moe_cfg = model_config("tiny_moe", "model.vocab_size=64", "model.n_layers=2", "moe.n_experts=64")
    torch.manual_seed(0)
    dense = build_model(dense_cfg)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    moe, details = granular.convert(dense, moe_cfg, seed=0)
    assert details["down_scale"] == pytest.approx(4 / 2.5)
    x = torch.randn(3, 50, 64) * 3
    ffn: DenseFFN = dense.layers[1].mlp
    want = ffn(x)
    got, stats = moe.layers[1].mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    chosen = moe.layers[1].mlp.router(x.reshape(-1, 64)).experts
    assert torch.equal(torch.sort(chosen % 4, dim=-1).values, torch.arange(4).expand_as(chosen))  # all 4 slices
    assert torch.all(chosen // 4 == chosen[:, :1] // 4)  # one virtual group


def test_granular_refuses_a_topk_that_cannot_cover_the_slices():
    dense_cfg = model_config("tiny_dense", "model.vocab_size=64", "model.n_layers=2")
    bad = model_config("tiny_moe", "model.vocab_size=64", "model.n_layers=2", "moe.topk=8")
    with pytest.raises(UserError, match="topk"):
        granular.convert(build_model(dense_cfg), bad)


def test_depth_expansion_is_exact_with_every_parameter_random():
    """Nonzero biases, sinks, value-residual logits and GRAPE frequencies: new layers still add exactly zero."""
    src_cfg = model_config("tiny_real", "model.vocab_size=64", "model.n_layers=8")
    dst_cfg = model_config("tiny_dense", "model.vocab_size=64", "model.n_layers=20")
    torch.manual_seed(0)
    source = build_model(src_cfg)
    with torch.no_grad():
        for name, p in source.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    result, details = expand.convert(source, dst_cfg)
    assert len(details["new_layers"]) == 12
    ids = torch.randint(0, 64, (2, 40))
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, 25:] = 1
    with torch.no_grad():
        torch.testing.assert_close(result(ids, doc_ids=doc_ids).logits, source(ids, doc_ids=doc_ids).logits,
                                   rtol=0, atol=0)
    for t in details["new_layers"]:
        assert not result.layers[t].attn.o_proj.bias.any() and not result.layers[t].mlp.down.bias.any()
        assert result.layers[t].value_residual_logit is not None
