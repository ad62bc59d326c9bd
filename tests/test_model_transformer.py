"""Whole-model behaviour: packed documents, value residual, kernels' device checks, dtype handling, names."""

import pytest
import torch

from vpmoe.errors import UserError
from vpmoe.model import Kernels, Transformer, build_model, positions_from_doc_ids
from vpmoe.model.naming import freeze_group, param_kind
from vpmoe.testing.models import model_config

f64 = torch.float64
TINY = ["tiny_compat", "tiny_real", "tiny_dense", "tiny_moe"]


def tiny(name, *overrides, seed=0):
    torch.manual_seed(seed)
    model = Transformer(model_config(name, "model.vocab_size=97", *overrides)).double()
    with torch.no_grad():  # nonzero biases, sinks and value-residual logits, so nothing hides behind init values
        for pname, p in model.named_parameters():
            if param_kind(pname) in ("bias", "sink", "value_residual"):
                p.normal_(std=0.3)
    return model


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


@pytest.mark.parametrize("name", TINY)
def test_packed_row_equals_documents_run_alone(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 13, 5]
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = model(ids, doc_ids=doc_ids)
    start = 0
    for doc in docs:
        alone = model(doc[None])
        torch.testing.assert_close(packed.logits[0, start:start + len(doc)], alone.logits[0], rtol=1e-8, atol=1e-8)
        start += len(doc)
    if packed.routing_counts is not None:
        alone_counts = sum(model(doc[None]).routing_counts for doc in docs)
        assert torch.equal(packed.routing_counts, alone_counts)


@pytest.mark.parametrize("name", ["tiny_real", "tiny_moe"])
def test_unseen_tokens_do_not_change_outputs(name):
    """Causality and document masking at model level: a change at token j in document 1 changes nothing before j
    and nothing in later documents."""
    model = tiny(name, "attention.window=4")
    ids = torch.randint(0, 97, (1, 40))
    doc_ids = torch.tensor([[0] * 10 + [1] * 15 + [2] * 15])
    base = model(ids, doc_ids=doc_ids).logits
    ids2 = ids.clone()
    ids2[0, 17] = (ids[0, 17] + 1) % 97
    out = model(ids2, doc_ids=doc_ids).logits
    changed = (out - base).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False] * 17 + [True] * 8 + [False] * 15


def test_value_residual_mixes_layer_zero_values():
    model = tiny("tiny_real")
    ids = torch.randint(0, 97, (2, 12))
    block = model.layers[1]
    assert model.layers[0].value_residual_logit is None and block.value_residual_logit is not None

    def output_after_perturbing(module):
        with torch.no_grad():
            saved = module.weight.clone()
            module.weight.add_(torch.randn_like(module.weight))
            out = model(ids).logits
            module.weight.copy_(saved)
        return out

    with torch.no_grad():
        block.value_residual_logit.fill_(60.0)  # lambda = 1: layer 1 uses layer 0's V only
    base = model(ids).logits
    torch.testing.assert_close(output_after_perturbing(block.attn.v_b), base, rtol=1e-8, atol=1e-8)
    assert not torch.allclose(output_after_perturbing(model.layers[0].attn.v_b), base)
    with torch.no_grad():
        block.value_residual_logit.fill_(-60.0)  # lambda = 0: layer 1 uses its own V only
    base = model(ids).logits
    assert not torch.allclose(output_after_perturbing(block.attn.v_b), base)


def test_compat_mode_has_no_biases_sinks_value_residual_or_local_layers():
    model = Transformer(model_config("tiny_compat", "model.vocab_size=97"))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") or "sinks" in n or "value_residual" in n or "grape" in n for n in names)
    assert {block.attn.kind for block in model.layers} == {"full"}


def test_real_mode_layer_schedule_is_three_local_one_global():
    cfg = model_config("vpMoE")
    kinds = [cfg.layer_kind(layer) for layer in range(80)]
    assert kinds.count("local") == 60 and kinds.count("global") == 20
    assert [layer for layer, kind in enumerate(kinds) if kind == "global"][:3] == [3, 7, 11]
    assert cfg.moe_layers == list(range(1, 80))


@pytest.mark.parametrize("name", TINY + ["vpDense0-5_28.compat", "vpDense0-5_28.real", "vpDense", "vpMoE"])
def test_every_parameter_has_a_role_and_a_freeze_group(name):
    with torch.device("meta"):
        model = Transformer(model_config(name))
    for pname, _ in model.named_parameters():
        param_kind(pname)
        freeze_group(pname)
    names = dict(model.named_parameters())
    assert "embed.weight" in names and "head.weight" in names and "final_norm.weight" in names


def test_gradients_reach_every_parameter():
    model = tiny("tiny_moe", "model.n_layers=4")
    out = model(torch.randint(0, 97, (2, 16)))
    loss = out.logits.square().mean() + out.aux_loss
    loss.backward()
    # Experts not routed to in this batch get no gradient; every other parameter does.
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        if ".experts." not in pname:
            assert p.grad.abs().sum() > 0, pname


def test_fast_kernels_on_cpu_are_an_error_not_a_switch():
    model = Transformer(model_config("tiny_moe", "model.vocab_size=97"))
    ids = torch.randint(0, 97, (1, 8))
    for kernels in (Kernels(attention="flex"), Kernels(experts="grouped_mm")):
        model.set_kernels(kernels)
        with pytest.raises(UserError, match="CUDA"):
            model(ids)
    with pytest.raises(UserError):
        Kernels(attention="fast")


def test_cast_keeps_fp32_frequencies_and_expert_bias():
    model = build_model(model_config("tiny_moe", "model.vocab_size=97"), dtype=torch.bfloat16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        expected = torch.float32 if name.endswith(("grape_log_freq", "expert_bias")) else torch.bfloat16
        assert tensor.dtype == expected, name
    out = model(torch.randint(0, 97, (1, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_build_model_is_deterministic_under_a_seed_and_initializes_everything():
    cfg = model_config("tiny_real", "model.vocab_size=97")
    torch.manual_seed(3)
    a = build_model(cfg)
    torch.manual_seed(3)
    b = build_model(cfg)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
        assert torch.isfinite(x).all(), name
    attn = a.layers[0].attn
    torch.testing.assert_close(attn.grape_log_freq[1], torch.tensor(-16 * (2 / 16) * 13.815510557964274))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = model_config("tiny_moe", "model.vocab_size=128")
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    ids = torch.randint(0, 128, (2, 40))
    doc_ids = (torch.arange(40) >= 17).long().expand(2, 40)

    def loss_and_grads(checkpointing):
        model.activation_checkpointing = checkpointing
        saved = []  # elements of the tensors autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(ids, doc_ids=doc_ids)
        loss = out.logits.square().mean() + out.aux_loss
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return loss, grads, out.routing_counts, sum(saved)

    loss, grads, counts, saved = loss_and_grads(False)
    loss_ckpt, grads_ckpt, counts_ckpt, saved_ckpt = loss_and_grads(True)
    assert saved_ckpt < saved / 3  # the blocks' activations are recomputed, not kept
    assert torch.equal(counts, counts_ckpt)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads_ckpt, grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_static_block_masks_refill_in_place_and_equal_fresh_masks():
    from vpmoe.model import attention_ops
    from vpmoe.model.attention import StaticBlockMasks

    masks = StaticBlockMasks()
    first_docs = (torch.arange(256) >= 100).long().expand(2, 256).clone()
    first = masks.get(first_docs, 32)
    addresses = [t.data_ptr() for t in (first.kv_num_blocks, first.kv_indices, first.full_kv_indices)]
    second_docs = (torch.arange(256) >= 7).long() + (torch.arange(256) >= 180).long()
    second_docs = torch.stack([second_docs, torch.zeros(256, dtype=torch.long)])
    second = masks.get(second_docs, 32)
    assert second is first
    assert [t.data_ptr() for t in (second.kv_num_blocks, second.kv_indices, second.full_kv_indices)] == addresses
    want = attention_ops.document_block_mask(second_docs, 32)
    assert torch.equal(second.to_dense(), want.to_dense())
    # the mask function reads the refilled document ids (partial blocks are decided element by element)
    q, k = torch.tensor(150), torch.tensor(140)
    assert bool(second.mask_mod(1, 0, q, k)) == bool(want.mask_mod(1, 0, q, k))
    assert bool(second.mask_mod(0, 0, torch.tensor(181), torch.tensor(179))) is False
    assert masks.get(second_docs, None) is not first  # one set per window


def test_cuda_graph_blocks_refuse_decoding_and_checkpointing():
    from vpmoe.model import KVCache
    from vpmoe.model.attention import StaticBlockMasks

    model = Transformer(model_config("tiny_moe"))
    model.static_masks = StaticBlockMasks()  # what compile_blocks(cuda_graphs=True) sets
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(UserError, match="full-sequence forwards"):
        model(ids, cache=KVCache(model.cfg))
    model.activation_checkpointing = True
    with pytest.raises(UserError, match="without activation"):
        model(ids)
