"""The lm-evaluation-harness adapter on small local tasks (no downloads): the harness's numbers must equal a
direct float64 computation with the model."""

import copy
import json

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from vpmoe import tokenizer as tk
from vpmoe.eval.lm_eval_adapter import VpmoeLM
from vpmoe.eval.suite import prompt_tokens
from vpmoe.model import build_model
from vpmoe.testing.models import model_config

MAX_LENGTH = 16  # small, so rolling loglikelihood needs several windows and generation truncates nothing here
MC = [
    {"q": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "label": 0},
    {"q": "Two plus two equals", "choices": ["four", "five"], "label": 1},
]
DOCS = [{"text": "The quick brown fox jumps over the lazy dog. " * 4}, {"text": "Hello world"}]
GEN = [{"q": "Count: one, two,", "a": "three"}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return build_model(model_config("tiny_moe")).eval()


@pytest.fixture(scope="module")
def reference(model):
    return copy.deepcopy(model).double()


def _logprobs(reference, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64 log-probabilities of the next token after each prefix (one unpadded forward)."""
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].log_softmax(-1)


def _score(reference, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    lp = _logprobs(reference, context + continuation)[len(context) - 1:-1]
    target = torch.tensor(continuation)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def _write_tasks(root):
    for name, rows in (("mc", MC), ("docs", DOCS), ("gen", GEN)):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = "dataset_path: json\ntest_split: test\n"

    def kwargs(name):
        return (f"dataset_kwargs:\n  data_files:\n    test: {root / name}.jsonl\n  cache_dir: {root / 'hf_cache'}\n")

    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + kwargs("mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "tiny_docs.yaml").write_text(
        "task: tiny_docs\n" + common + kwargs("docs") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + kwargs("gen") + "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")


def test_simple_evaluate_matches_direct_computation(model, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_tasks(tmp_path)
    lm = VpmoeLM(model=model, batch_size=4, max_length=MAX_LENGTH, max_gen_toks=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_docs", "tiny_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                  bootstrap_iters=0)

    # multiple choice: each choice's loglikelihood and greediness, and the accuracy they imply
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for doc, sample in zip(MC, samples):
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole, ctx = tk.encode(context + continuation), tk.encode(context)
            assert whole[:len(ctx)] == ctx
            expected, greedy = _score(reference, ctx, whole[len(ctx):])
            assert resp[0][0] == pytest.approx(expected, abs=1e-3)
            assert resp[0][1] == greedy
            scores.append(expected)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    # rolling loglikelihood: every token scored once, in windows of MAX_LENGTH targets, each window's input the
    # MAX_LENGTH tokens of <|endoftext|> + text that end just before its last target
    samples = sorted(out["samples"]["tiny_docs"], key=lambda s: s["doc_id"])
    for doc, sample in zip(DOCS, samples):
        ids = tk.encode(doc["text"])
        full = [tk.EOD] + ids
        expected = 0.0
        for start in range(0, len(ids), MAX_LENGTH):
            end = min(start + MAX_LENGTH, len(ids))
            expected += _score(reference, full[max(0, end - MAX_LENGTH):start + 1], ids[start:end])[0]
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-3)
    assert len(tk.encode(DOCS[0]["text"])) > 2 * MAX_LENGTH  # several windows were exercised

    # generation: greedy tokens (a plain loop without a KV cache), decoded, cut at the first "\n"
    sample = out["samples"]["tiny_gen"][0]
    ids = tk.encode(GEN[0]["q"])
    generated = []
    for _ in range(4):
        token = int(_logprobs(reference, ids + generated)[-1].argmax())
        if token == tk.EOD:
            break
        generated.append(token)
    assert sample["resps"][0][0] == tk.decode(generated).split("\n")[0]


def test_harmony_mode_scores_the_final_channel(model, reference):
    lm = VpmoeLM(model=model, harmony=True, max_length=512)
    request = Instance("loglikelihood", {}, ("What is the capital of France?", " Paris"), 0)
    (got, greedy), = lm.loglikelihood([request])
    final_head = [tk.CHANNEL, *tk.encode("final"), tk.MESSAGE]
    context = prompt_tokens("What is the capital of France?", "medium") + final_head
    expected, expected_greedy = _score(reference, context, tk.encode("Paris"))
    assert got == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_adapter_is_registered_and_needs_one_model_source(model):
    from lm_eval.api.registry import get_model

    assert get_model("vpmoe") is VpmoeLM
    from vpmoe.errors import UserError

    with pytest.raises(UserError):
        VpmoeLM()
