"""Generation: KV-cache logits equal the full forward; windowed caches stay bounded; greedy, sampled, batched."""

import pytest
import torch

from vpmoe.model import KVCache, generate
from vpmoe.model.transformer import Transformer
from vpmoe.testing.models import model_config


def tiny(name, *overrides):
    torch.manual_seed(0)
    model = Transformer(model_config(name, "model.vocab_size=61", *overrides)).double()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("bias", "sinks", "value_residual_logit")):
                p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("name", ["tiny_compat", "tiny_real", "tiny_moe"])
def test_incremental_logits_match_the_full_forward(name):
    model = tiny(name, "attention.window=8")
    ids = torch.randint(0, 61, (2, 30))
    full = model(ids).logits
    cache = KVCache(model.cfg)
    chunks = [model(ids[:, :5], cache=cache).logits]  # prefill, then chunks of 1 and 3 tokens
    start = 5
    for size in [1] * 12 + [3] * 4 + [1]:
        chunks.append(model(ids[:, start:start + size], cache=cache).logits)
        start += size
    assert start == 30
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-8, atol=1e-8)
    for layer, block in enumerate(model.layers):
        kept = cache[layer].k.shape[2]
        assert kept == (8 if block.attn.kind == "local" else 30)


def test_greedy_generation_equals_argmax_of_full_forward_and_logprobs_match():
    model = tiny("tiny_moe", "attention.window=8")
    prompt = torch.randint(0, 61, (12,)).tolist()
    result = generate(model, [prompt], max_new_tokens=15)
    seq = list(prompt)
    for step in range(15):
        logits = model(torch.tensor([seq])).logits[0, -1]
        token = int(logits.argmax())
        assert int(result.tokens[0, step]) == token
        torch.testing.assert_close(result.logprobs[0, step].double(), torch.log_softmax(logits, -1)[token].double(),
                                   rtol=1e-5, atol=1e-6)
        seq.append(token)
    assert int(result.lengths[0]) == 15


def test_batched_left_padded_generation_equals_one_by_one():
    model = tiny("tiny_real", "attention.window=8")
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 11, 7)]
    batched = generate(model, prompts, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=10)
        assert batched.tokens[row].tolist() == alone.tokens[0].tolist()


def test_stop_tokens_end_a_row_and_pad_the_rest():
    model = tiny("tiny_real")
    prompt = torch.randint(0, 61, (5,)).tolist()
    free = generate(model, [prompt], max_new_tokens=6)
    stop = int(free.tokens[0, 2])
    first = free.tokens[0].tolist().index(stop)
    stopped = generate(model, [prompt], max_new_tokens=6, stop_ids=[stop], pad_id=-1)
    assert stopped.tokens[0, :first + 1].tolist() == free.tokens[0, :first + 1].tolist()
    assert stopped.tokens[0, first + 1:].tolist() == [-1] * (5 - first)
    assert int(stopped.lengths[0]) == first + 1


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny("tiny_moe")
    prompts = [torch.randint(0, 61, (6,)).tolist()] * 2

    def sample(seed, **kw):
        return generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0).tokens, sample(0).tokens)
    assert not torch.equal(sample(0).tokens, sample(1).tokens)
    assert torch.equal(sample(0, top_k=1).tokens, generate(model, prompts, 12).tokens)
    assert torch.equal(sample(0, top_p=1e-9).tokens, generate(model, prompts, 12).tokens)
