"""Core eval: held-out metrics against hand computations, the micro-suite scorer, sanity checks, reports, CLI."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vpmoe import tokenizer as tk
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.cli import main
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.loader import SplitReader
from vpmoe.errors import UserError
from vpmoe.eval import heldout
from vpmoe.eval import suite as suite_mod
from vpmoe.eval.heldout import heldout_loss
from vpmoe.eval.sanity import run_sanity
from vpmoe.eval.suite import (
    SUITE_FILE,
    load_suite,
    parse_completion,
    prompt_tokens,
    run_suite,
    score_answer,
    summarize,
)
from vpmoe.model import build_model
from vpmoe.testing.models import model_config

V = tk.VOCAB_SIZE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Unpacked: each sample is one rendered conversation (reasoning and final spans)."""
    root = tmp_path_factory.mktemp("eval_ds")
    inputs = synthetic.write_corpus(root / "src", 40, shards=1, seed=11)
    return build(DataSection(inputs=[str(p) for p in inputs], format="synth", out=str(root / "ds"), seq_len=256,
                             pack=False, valid_fraction=0.3))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(model_config("tiny_moe")).eval()


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    """Two items of the shipped suite (generation with a random model is slow on CPU; scoring is tested apart)."""
    path = tmp_path_factory.mktemp("suite") / "small.jsonl"
    lines = SUITE_FILE.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[-1]]) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ held-out


class _Body:
    def __init__(self, hidden):
        self.hidden = hidden


class UniformModel(nn.Module):
    """Logits all zero: p(token) = 1 / V everywhere, so loss = ln V, perplexity = V."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, V, bias=False)
        nn.init.zeros_(self.head.weight)

    def body(self, input_ids, position_ids, doc_ids):
        return _Body(torch.zeros(*input_ids.shape, 1))


def _hand_counts(dataset, n):
    """Per span: target-token count and the UTF-8 bytes of the target text, computed from the raw samples by
    decoding each maximal run of same-span targets as one byte string (no per-token table)."""
    reader, enc = SplitReader(dataset, "valid"), tk.encoding()
    tokens, nbytes = {1: 0, 2: 0}, {1: 0, 2: 0}
    for i in range(n):
        ids, spans = reader.sample(i)
        targets, target_spans = ids[1:].tolist(), spans[1:].tolist()
        start = 0
        for t in range(1, len(targets) + 1):
            if t == len(targets) or target_spans[t] != target_spans[start]:
                s = target_spans[start]
                if s in tokens:
                    tokens[s] += t - start
                    nbytes[s] += len(enc.decode_bytes(targets[start:t]))
                start = t
    return tokens, nbytes


def test_heldout_uniform_model_matches_hand_computation(dataset):
    n = 3
    result = heldout_loss(UniformModel(), dataset, "valid", max_samples=n, batch_size=2)
    tokens, nbytes = _hand_counts(dataset, n)
    assert result["samples"] == n
    for name, members in (("reasoning", (1,)), ("final", (2,)), ("all", (1, 2))):
        m = result["spans"][name]
        count, size = sum(tokens[s] for s in members), sum(nbytes[s] for s in members)
        assert count > 0 and m["tokens"] == count and m["bytes"] == size
        assert m["loss"] == pytest.approx(math.log(V), rel=1e-6)
        assert m["perplexity"] == pytest.approx(V, rel=1e-5)
        assert m["bits_per_byte"] == pytest.approx(count * math.log2(V) / size, rel=1e-6)


def test_heldout_tiny_model_matches_float64_recomputation(model, dataset):
    """Batched, padded fp32 eval == an unpadded per-sample float64 forward with labels taken by hand."""
    n = 2
    reader = SplitReader(dataset, "valid")
    assert len(reader.sample(0)[0]) != len(reader.sample(1)[0])  # so the batch has padding
    result = heldout_loss(model, dataset, "valid", max_samples=n, batch_size=2)
    reference = copy.deepcopy(model).double()
    nats = {1: 0.0, 2: 0.0}
    with torch.no_grad():
        for i in range(n):
            ids, spans = reader.sample(i)
            ids = torch.from_numpy(ids.astype("int64"))
            logprobs = reference(ids[None]).logits[0].log_softmax(-1)
            for t in range(len(ids) - 1):
                if spans[t + 1] in nats:
                    nats[int(spans[t + 1])] -= float(logprobs[t, ids[t + 1]])
    tokens, nbytes = _hand_counts(dataset, n)
    for name, members in (("reasoning", (1,)), ("final", (2,)), ("all", (1, 2))):
        m = result["spans"][name]
        total, count, size = sum(nats[s] for s in members), sum(tokens[s] for s in members), sum(
            nbytes[s] for s in members)
        assert m["tokens"] == count
        assert m["loss"] == pytest.approx(total / count, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
        assert m["bits_per_byte"] == pytest.approx(total / (math.log(2) * size), rel=1e-5)


def test_token_bytes_table():
    table = heldout.token_bytes()
    enc = tk.encoding()
    assert len(table) == V
    assert table[tk.RETURN] == len("<|return|>")
    for text in ("Hello world", "naïve 東京 🚀"):
        ids = tk.encode(text)
        assert table[ids].sum() == len(text.encode("utf-8")) == len(enc.decode_bytes(ids))


def test_heldout_errors(dataset):
    with pytest.raises(UserError, match="no split"):
        heldout_loss(UniformModel(), dataset, "nope")


# ---------------------------------------------------------------------------------------------------- suite


def test_shipped_suite_is_pinned_and_covers_the_categories():
    s = load_suite()
    assert s.version == suite_mod.SUITE_VERSION and s.sha256 == suite_mod.SUITE_SHA256
    assert len(s.items) >= 40
    counts = {c: sum(i.category == c for i in s.items) for c in s.categories}
    assert set(counts) == {"arithmetic", "factual", "reasoning", "format"}
    assert min(counts.values()) >= 8
    assert len({i.prompt for i in s.items}) == len(s.items)


def test_each_item_rejects_the_other_answers_of_its_category():
    s = load_suite()
    for item in s.items:
        assert score_answer(item, item.reference)
        assert not score_answer(item, None) and not score_answer(item, "")
        for other in s.items:
            if other.category == item.category and other.id != item.id:
                assert not score_answer(item, other.reference), (item.id, other.reference)


KNOWN = [
    ("arith-01", "42", True), ("arith-01", " 42. ", True), ("arith-01", "The answer is 42.", True),
    ("arith-01", "43", False), ("arith-01", "420", False), ("arith-01", "42 or 43", False),
    ("arith-10", "1024", True), ("arith-10", "1,024 maybe", False),
    ("fact-01", "Paris", True), ("fact-01", "paris", True), ("fact-01", "**Paris**", True),
    ("fact-01", "Paris, France", False), ("fact-01", "Lyon", False),
    ("fact-07", "Shakespeare", True), ("fact-07", "William Shakespeare.", True), ("fact-07", "Marlowe", False),
    ("fact-08", "100 °C", True), ("fact-08", "212", False),
    ("fact-10", "CO2", True), ("fact-10", "oxygen", False),
    ("reason-01", "Ann", True), ("reason-01", "Sam", False),
    ("reason-06", "16:30", True), ("reason-06", "4:30 PM", False),
    ("reason-09", "5", True), ("reason-09", "100", False),
    ("format-01", "blue", True), ("format-01", "Red", False), ("format-01", "green", False),
    ("format-02", '{"answer": 4}', True), ("format-02", '```json\n{"answer": 4}\n```', True),
    ("format-02", '{"answer": "4"}', False), ("format-02", '{"answer": 4, "x": 1}', False),
    ("format-02", "answer: 4", False),
    ("format-03", "OK", True), ("format-03", "ok", False), ("format-03", "OK then", False),
    ("format-07", '{"country": "italy", "city": "Rome"}', True),
    ("format-07", '{"city": "Milan", "country": "Italy"}', False),
    ("format-08", "D-O-G", True), ("format-08", "d-o-g", False), ("format-08", "DOG", False),
    ("format-11", '["a", "b", "c"]', True), ("format-11", '["a", "b"]', False), ("format-11", '"abc"', False),
    ("format-12", "It is blue.", True), ("format-12", "Blue, bright blue", True),
    ("format-12", "The sky is blue today", False), ("format-12", "It is azure", False),
]


@pytest.mark.parametrize("item_id,answer,right", KNOWN)
def test_scorer_on_known_answers(item_id, answer, right):
    item = {i.id: i for i in load_suite().items}[item_id]
    assert score_answer(item, answer) is right


def _completion(*messages, stop=tk.RETURN):
    """Tokens an ideal model generates after `<|start|>assistant`, rendered by openai-harmony."""
    from openai_harmony import Message, Role

    tokens = []
    for channel, text in messages:
        tokens += tk.harmony().render(Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel))
    tokens = tokens[2:]  # drop the leading <|start|>assistant (it ends the prompt)
    tokens[-1] = stop  # the last message closes with <|return|> instead of <|end|>
    return tokens


def test_subset_is_round_robin_over_categories():
    s = load_suite()
    small = suite_mod.subset(s, 6)
    counts = {c: sum(i.category == c for i in small.items) for c in s.categories}
    assert len(small.items) == 6 and sorted(counts.values()) == [1, 1, 2, 2]
    assert [i.id for i in small.items if i.category == "arithmetic"] == ["arith-01", "arith-02"]
    assert suite_mod.subset(s, 0) is s and suite_mod.subset(s, 1000) is s


def test_parse_completion():
    good = parse_completion(_completion(("analysis", "17 + 25 = 42."), ("final", "42")))
    assert good.parsed and good.stopped and good.valid and good.final == "42"
    truncated = parse_completion(_completion(("analysis", "thinking"), ("final", "42"))[:-1])
    assert truncated.parsed and not truncated.stopped and not truncated.valid
    only_analysis = parse_completion(_completion(("analysis", "hmm")))
    assert only_analysis.parsed and only_analysis.final is None and not only_analysis.valid
    garbage = parse_completion(tk.encode("just text, no header") + [tk.RETURN])
    assert not garbage.parsed and garbage.final is None and garbage.error


def test_summarize_scores_final_channels():
    s = load_suite()
    completions = []
    for n, item in enumerate(s.items):
        answer = item.reference if n % 2 == 0 else "no idea"
        completions.append(parse_completion(_completion(("analysis", "let me think"), ("final", answer))))
    summary = summarize(s, completions)
    right = [n % 2 == 0 for n in range(len(s.items))]
    assert summary["correct"] == sum(right) and summary["accuracy"] == pytest.approx(sum(right) / len(right))
    for category, entry in summary["by_category"].items():
        members = [r for r, item in zip(right, s.items) if item.category == category]
        assert entry == {"correct": sum(members), "total": len(members), "accuracy": sum(members) / len(members)}
    assert summary["parse_valid_share"] == summary["stop_with_return_share"] == summary["valid_harmony_share"] == 1.0


def test_prompt_is_harmony_completion_prompt():
    ids = prompt_tokens("What is 2 + 2?", "low")
    text = tk.decode(ids)
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: low" in text
    assert text.endswith("<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")


def test_run_suite_tiny_model(model, small_suite):
    s = load_suite(small_suite)
    assert s.version == "custom" and len(s.items) == 2
    result = run_suite(model, s, max_new_tokens=3, batch_size=2)
    assert result["items"] == 2 and len(result["results"]) == 2
    # Each item's completion against a plain greedy loop over full forwards (no cache, no batching), stopped at
    # <|return|> / <|call|>; near-ties (top-2 within fp32 noise) end the comparison of a row there.
    for item, got in zip(s.items, result["results"]):
        ids, completion = prompt_tokens(item.prompt, "medium"), []
        with torch.no_grad():
            for _ in range(3):
                top = model(torch.tensor([ids + completion])).logits[0, -1].double().topk(2)
                assert top.values[0] - top.values[1] > 1e-4, "a near-tie: choose another suite item"
                completion.append(int(top.indices[0]))
                if completion[-1] in (tk.RETURN, tk.CALL):
                    break
        want = parse_completion(completion)
        assert (got["tokens"], got["parsed"], got["stopped"], got["final"]) == (
            len(completion), want.parsed, want.stopped, want.final)
    assert result["parse_valid_share"] == sum(r["parsed"] for r in result["results"]) / 2
    assert result["accuracy"] == sum(r["correct"] for r in result["results"]) / 2
    assert result["decoding"] == {"greedy": True, "max_new_tokens": 3, "reasoning_effort": "medium",
                                  "stop_ids": [tk.RETURN, tk.CALL]}


def test_suite_file_errors(tmp_path, monkeypatch):
    item = json.loads(SUITE_FILE.read_text().splitlines()[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**item, "reference": "41"}) + "\n")
    with pytest.raises(UserError, match="does not pass its own scorer"):
        load_suite(bad)
    bad.write_text(json.dumps({**item, "score": {"type": "fuzzy"}}) + "\n")
    with pytest.raises(UserError, match="score type"):
        load_suite(bad)
    bad.write_text(json.dumps(item) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(UserError, match="duplicate"):
        load_suite(bad)
    edited = tmp_path / "suite.jsonl"
    edited.write_text(SUITE_FILE.read_text().replace("17 + 25", "17 + 26"))
    monkeypatch.setattr(suite_mod, "SUITE_FILE", edited)
    with pytest.raises(UserError, match="pinned"):
        load_suite()


# --------------------------------------------------------------------------------------------------- sanity


def test_sanity_checks_pass(model):
    shares = {"items": 4, "parse_valid_share": 0.5, "stop_with_return_share": 0.25, "valid_harmony_share": 0.25}
    result = run_sanity(model, shares)
    assert result["ok"], result
    names = {c["name"] for c in result["checks"]}
    assert {"tokenizer_roundtrip", "special_token_ids", "harmony_stop_tokens", "prompt_matches_training_render",
            "model_vocab_covers_tokenizer"} <= names
    assert result["generations"] == shares


def test_sanity_detects_a_broken_tokenizer(monkeypatch):
    monkeypatch.setattr(tk, "decode", lambda ids: "x")
    result = run_sanity()
    assert not result["ok"]
    assert [c["name"] for c in result["checks"] if not c["ok"]] == ["tokenizer_roundtrip"]


# ---------------------------------------------------------------------------------------------- CLI, reports


def _trained_run(root: Path, dataset: Path) -> Path:
    """A run directory written by `vpmoe train`: two steps of the tiny CE stage, a checkpoint after each."""
    from vpmoe.train.config import load_train_config
    from vpmoe.train.trainer import train

    return train(load_train_config("tiny_ce", [
        f"data.path={json.dumps(str(dataset))}", f"run.dir={json.dumps(str(root))}", "train.steps=2",
        "checkpoint.every=1", "optim.warmup_steps=1"]))


def test_cli_eval_run_steps_object_and_comparison(model, dataset, small_suite, tmp_path, capsys):
    run = _trained_run(tmp_path / "run", dataset)
    common = ["--set", "eval.max_samples=2", "--set", f'eval.suite="{small_suite}"', "--set",
              "eval.max_new_tokens=2", "--set", 'eval.device="cpu"']

    assert main(["eval", "--checkpoint", str(run), "--all-steps", "--dataset", str(dataset), *common]) == 0
    out = capsys.readouterr().out
    evals = run / "eval"
    for name in ("step_0000001", "step_0000002"):
        report = json.loads((evals / f"{name}.json").read_text())
        assert report["schema"] == "vpmoe.eval/1"
        assert report["checkpoint"]["step"] == int(name[-1]) and report["checkpoint"]["label"] == f"run@{name[-1]}"
        assert report["heldout"]["samples"] == 2 and report["suite"]["items"] == 2 and report["sanity"]["ok"]
        parents = report["provenance"]["parents"]
        assert parents[0]["kind"] == "run" and parents[0]["stage"] == "ce" and "dataset" in parents[1]
        md = (evals / f"{name}.md").read_text()
        assert "## Held-out loss" in md and "## Micro-suite" in md and "## Sanity" in md
    first, second = (json.loads((evals / f"step_000000{i}.json").read_text()) for i in (1, 2))
    assert first["heldout"]["spans"]["all"]["loss"] != second["heldout"]["spans"]["all"]["loss"]
    assert (evals / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (evals / "compare.md").read_text()
    assert "run@1" in table and "run@2" in table and "compare.png" in table
    rows = json.loads((evals / "compare.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == second["heldout"]["spans"]["all"]["loss"]
    assert "run@1" in out and "bits/byte" in out  # the comparison table is printed

    # The same settings again: reports are reused, not recomputed.
    mtime = (evals / "step_0000001.json").stat().st_mtime_ns
    assert main(["eval", "--checkpoint", str(run), "--all-steps", "--dataset", str(dataset), *common]) == 0
    assert "reused" in capsys.readouterr().out
    assert (evals / "step_0000001.json").stat().st_mtime_ns == mtime

    # A checkpoint object next to a training checkpoint, from a config file: reports beside each, one comparison.
    obj = save_model(load_model(run / "checkpoints" / "step_0000001"), tmp_path / "tiny_obj")
    config = tmp_path / "eval.toml"
    config.write_text(
        f'[eval]\ncheckpoint = ["{obj}", "{run / "checkpoints" / "step_0000001"}"]\n'
        f'dataset = "{dataset}"\nout = "{tmp_path / "cmp"}"\nparts = ["heldout", "sanity"]\nmax_samples = 2\n'
        'device = "cpu"\n')
    assert main(["eval", str(config)]) == 0
    obj_report = json.loads((obj / "eval" / "tiny_obj.json").read_text())
    assert obj_report["checkpoint"]["step"] is None and "suite" not in obj_report
    # Same weights, same held-out samples: the object and step 1 agree.
    step1 = json.loads((evals / "step_0000001.json").read_text())  # recomputed: parts differ from before
    assert "suite" not in step1
    assert obj_report["heldout"]["spans"]["all"]["loss"] == pytest.approx(step1["heldout"]["spans"]["all"]["loss"])
    assert (tmp_path / "cmp" / "compare.png").is_file() and (tmp_path / "cmp" / "compare.md").is_file()


def test_cli_eval_errors(tmp_path, model, capsys):
    assert main(["eval"]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    obj_a = save_model(model, tmp_path / "a")
    obj_b = tmp_path / "b"
    obj_b.mkdir()
    for f in ("config.json", "model.safetensors"):
        (obj_b / f).symlink_to(obj_a / f)
    # Two checkpoint objects without --out: no run to put the comparison in.
    assert main(["eval", "--checkpoint", str(obj_a), "--checkpoint", str(obj_b)]) == 2
    assert "eval.out" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(obj_a), "--set", 'eval.parts=["vibes"]']) == 2
    assert main(["eval", "--checkpoint", str(obj_a), "--dataset", str(tmp_path / "nope"),
                 "--set", 'eval.parts=["heldout"]']) == 2
    assert main(["eval", "--checkpoint", str(obj_a), "--set", 'eval.parts=["teacher_kl"]']) == 2
    assert "teacher sidecar" in capsys.readouterr().err
