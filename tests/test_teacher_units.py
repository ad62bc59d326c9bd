"""Teacher scoring units: chunked top-K against a float64 reference, documents and batches, the config."""

import numpy as np
import pytest
import torch

from vpmoe import config
from vpmoe import tokenizer as tk
from vpmoe.errors import UserError
from vpmoe.teacher.config import ScoreConfig
from vpmoe.teacher.documents import make_batches, split_documents
from vpmoe.teacher.sidecar import supervised_positions
from vpmoe.teacher.topk import score_positions, topk_grouped

EOD = tk.EOD


@pytest.mark.parametrize("chunk, v", [(1, 3000), (7, 3000), (64, 3000), (7, 128 * 40)])
def test_score_positions_matches_float64_reference(chunk, v):
    """v = 3000 takes torch.topk, v = 5120 the grouped top-K (128-wide groups)."""
    g = torch.Generator().manual_seed(chunk)
    n, h, k = 29, 16, 8
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    bias = torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    s = score_positions(hidden, targets, weight, bias, k, chunk)

    logp = torch.log_softmax(hidden.double() @ weight.double().T + bias.double(), dim=-1)
    ref_values, ref_ids = logp.topk(k + 1, dim=-1)
    assert s.topk_ids.dtype == torch.int32 and s.topk_ids.shape == (n, k)
    # fp32 chunks against float64: the ids exactly where no two of the top K + 1 lie within fp32 noise, and
    # everywhere a set of K ids whose reference values reach the K-th
    clear = (ref_values[:, :-1] - ref_values[:, 1:]).min(dim=1).values > 1e-4
    assert torch.equal(s.topk_ids.long()[clear], ref_ids[clear, :k]) and clear.float().mean() > 0.9
    assert (logp.gather(1, s.topk_ids.long()) >= ref_values[:, k - 1 : k] - 1e-4).all()
    ref_values = ref_values[:, :k]
    torch.testing.assert_close(s.topk_logprobs.double(), ref_values, rtol=0, atol=1e-4)
    torch.testing.assert_close(s.target_logprob.double(), logp.gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-4)
    # entropy = logsumexp - sum(p * logit) in fp32: a statistic, good to ~1e-4 relative
    torch.testing.assert_close(s.entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s.topk_mass.double(), ref_values.exp().sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_grouped_equals_topk(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(50, 128 * 300, generator=g)
    x[0, 1000:1100] = 9.0  # many equal maxima in one row: the values must still match
    values, ids = topk_grouped(x, k)
    ref_values, ref_ids = torch.topk(x, k, dim=-1)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, ids), values)
    assert torch.equal(ids[1:], ref_ids[1:])


def test_score_positions_bf16_head_is_not_rounded_to_bf16():
    """A bf16 head's logits stay fp32: the result equals fp32 math on the bf16 operands, not bf16 logits."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    weight = (torch.randn(5000, 64, generator=g) * 0.5).to(torch.bfloat16)
    targets = torch.zeros(5, dtype=torch.long)
    s = score_positions(hidden, targets, weight, None, 4, 2)
    exact = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    torch.testing.assert_close(s.target_logprob.double(), exact[:, 0], rtol=0, atol=1e-4)


def _packed(docs):
    """Tokens and spans of one packed sample made of (tokens, spans) documents joined by EOD."""
    tokens, spans = [], []
    for i, (t, s) in enumerate(docs):
        if i:
            tokens.append(EOD)
            spans.append(0)
        tokens += t
        spans += s
    return np.array(tokens, np.int32), np.array(spans, np.uint8)


def test_split_documents_and_batches_map_back_to_token_order():
    s1 = _packed([([5, 6, 7, 8], [0, 0, 1, 2]), ([9, 10, 11], [0, 0, 0]), ([12, 13, 14, 15, 16], [0, 1, 1, 0, 0])])
    s2 = _packed([([20, 21, 22, 23, 24, 25], [0, 0, 1, 1, 2, 2])])
    tokens = np.concatenate([s1[0], s2[0]])
    spans = np.concatenate([s1[1], s2[1]])
    docs = split_documents(tokens, spans, np.array([len(s1[0]), len(s2[0])]))
    assert docs.counts.tolist() == [4, 4]
    assert docs.supervised.tolist() == np.flatnonzero(spans).tolist()
    # scored documents only (the all-zero one is skipped), fed up to their last supervised token
    assert docs.doc_start.tolist() == [0, 9, 14]
    assert docs.doc_length.tolist() == [3, 2, 5]
    for budget in (1, 5, 10, 100):
        batches = make_batches(docs, budget)
        dest = np.concatenate([b.dest for b in batches])
        assert sorted(dest.tolist()) == list(range(8))
        for b in batches:
            assert b.input_ids.shape[0] == 1 or b.input_ids.size <= budget
            flat = b.input_ids.reshape(-1)
            # the token at the predicting row is the one just before the supervised token, in its own document
            assert np.array_equal(flat[b.rows], tokens[docs.supervised[b.dest] - 1])
            assert np.array_equal(b.targets, tokens[docs.supervised[b.dest]])
            assert (b.input_ids[:, 0] != EOD).all()  # every row starts at a document's first token


def test_supervised_positions_agree_with_split_documents():
    t, s = _packed([([1, 2, 3], [0, 1, 2]), ([4, 5], [0, 1])])
    assert supervised_positions(s).tolist() == [0, 1, 4]
    assert (split_documents(t, s, np.array([len(t)])).supervised - 1).tolist() == [0, 1, 4]


@pytest.mark.parametrize("where", ["document start", "eod"])
def test_supervised_boundary_tokens_are_refused(where):
    t, s = _packed([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])])
    if where == "document start":
        s[4] = 1
    else:
        s[3] = 1
    with pytest.raises(UserError, match="cross a document boundary"):
        split_documents(t, s, np.array([len(t)]))


def test_config_defaults_and_errors(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[teacher]\npath = "m"\ndataset = "d"\n')
    cfg = config.load(path, ScoreConfig)
    assert (cfg.teacher.k, cfg.teacher.dtype, cfg.teacher.splits) == (64, "bfloat16", ["train", "valid"])
    assert cfg.score.device == "cuda" and cfg.score.device_map == "none"
    with pytest.raises(UserError, match="score.gpus_per_rank"):
        config.load(path, ScoreConfig, ["score.gpus_per_rank=2"])
    with pytest.raises(UserError, match="teacher.k"):
        config.load(path, ScoreConfig, ["teacher.k=0"])
    with pytest.raises(UserError, match="unknown key 'score.chunk'"):
        config.load(path, ScoreConfig, ["score.chunk=3"])
    for name in ("gpt_oss_120b", "tiny_cpu"):
        config.load(f"configs/teacher/{name}.toml", ScoreConfig)
