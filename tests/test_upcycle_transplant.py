"""Step 1, the vocabulary transplant, with mergekit's tokensurgeon running for real on tiny models and tokenizers:
a tiny Qwen3 with its own small BPE, and a tiny GPT-OSS donor whose BPE has the Harmony special tokens."""

import json
import math

import mergekit  # noqa: F401  (a test extra: a broken install fails here instead of skipping the transplant)
import pytest
import torch
from safetensors.torch import load_file

from vpmoe.errors import UserError
from vpmoe.spans import NAMES as SPAN_NAMES
from vpmoe.testing import upcycle as testing
from vpmoe.upcycle import drift, hf, transplant
from vpmoe.upcycle.config import load_upcycle_config
from vpmoe.upcycle.objects import read_provenance
from vpmoe.upcycle.run import upcycle


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("transplant")
    facts = testing.save_transplant_pair(root)
    return root, facts


def _run(root, out, registry_text, extra_transplant="", name="t"):
    (root / f"{name}.objects.toml").write_text(registry_text)
    path = root / f"{name}.toml"
    path.write_text(testing.step_config_text(
        "transplant", "qwen3-0_6B", "qwen3-0_6B-o200k", root / "source", root / out, root / f"{name}.objects.toml",
        records=2, extra=f'[transplant]\ndonor = "{(root / "donor").as_posix()}"\ndonor_object = "gpt-oss-20b"\n'
                        f'k = 64\n{extra_transplant}'))
    return upcycle(load_upcycle_config(path))[0]


def _drift_by_hand(source_dir, result_dir, rows) -> dict:
    """drift.json's transplant figures from their definitions, in float64: per span, each model's bits per byte
    (next-token NLL of the tokens whose first character is in the span / ln 2 / their UTF-8 bytes) and top-1
    agreement over the shared vocabulary where both tokenizations end a token at the same character (the span of
    the next character)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vpmoe import tokenizer as tk

    sides = {side: (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(),
                    AutoTokenizer.from_pretrained(str(d))) for side, d in (("source", source_dir),
                                                                          ("result", result_dir))}
    vocab = {side: tok.get_vocab() for side, (_, tok) in sides.items()}
    shared = sorted(set(vocab["source"]) & set(vocab["result"]))
    shared_ids = {side: torch.tensor([vocab[side][t] for t in shared]) for side in sides}
    nll = {(side, name): 0.0 for side in sides for name in SPAN_NAMES.values()}
    nbytes = dict.fromkeys(nll, 0)
    agree = {name: [0, 0] for name in SPAN_NAMES.values()}  # [agreeing, aligned]
    for row in rows:
        ids = row.tokens.tolist()
        text = tk.decode(ids)
        char_span = [0] * len(text)
        for i in range(len(ids)):
            for c in range(len(tk.decode(ids[:i])), len(tk.decode(ids[: i + 1]))):
                char_span[c] = int(row.spans[i])
        argmax_at = {}  # side -> {character where a token ends: argmax of the next token over the shared vocab}
        for side, (model, tok) in sides.items():
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for t in range(1, len(enc["input_ids"])):
                start, end = enc["offset_mapping"][t]
                name = SPAN_NAMES[char_span[start]]
                nll[side, name] -= float(logp[t - 1, enc["input_ids"][t]])
                nbytes[side, name] += len(text[start:end].encode("utf-8"))
            argmax_at[side] = {enc["offset_mapping"][t][1]: shared[int(logits[t, shared_ids[side]].argmax())]
                               for t in range(len(enc["input_ids"]) - 1)}
        for c in set(argmax_at["source"]) & set(argmax_at["result"]):
            name = SPAN_NAMES[char_span[c] if c < len(text) else 0]
            agree[name][0] += argmax_at["source"][c] == argmax_at["result"][c]
            agree[name][1] += 1
    agree["all"] = [sum(a[0] for a in agree.values()), sum(a[1] for a in agree.values())]
    for side in sides:
        nll[side, "all"] = sum(nll[side, n] for n in SPAN_NAMES.values())
        nbytes[side, "all"] = sum(nbytes[side, n] for n in SPAN_NAMES.values())
    return {name: {"aligned_positions": agree[name][1],
                   "top1_agreement": agree[name][0] / agree[name][1] if agree[name][1] else None,
                   **{f"{side}_bits_per_byte": nll[side, name] / math.log(2) / nbytes[side, name]
                      if nbytes[side, name] else None for side in sides}}
            for name in agree}


def test_transplant_runs_tokensurgeon_and_checks_rows_and_harmony_specials(pair):
    root, facts = pair
    out = _run(root, "o200k", testing.transplant_registry_text(facts))
    assert hf.facts(out)["vocab"] == facts["donor_vocab"]
    tok = hf.load_tokenizer(out)
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in facts["specials"].items())
    # shared tokens keep the source's rows exactly; the others are OMP combinations (not zero)
    src, dst = load_file(str(root / "source" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    src_vocab, dst_vocab = hf.load_tokenizer(root / "source").get_vocab(), tok.get_vocab()
    shared = [t for t in dst_vocab if t in src_vocab]
    assert len(shared) > 64
    for t in shared[:50]:
        assert torch.equal(dst[hf.EMBED][dst_vocab[t]], src[hf.EMBED][src_vocab[t]])
    new = [dst_vocab[t] for t in dst_vocab if t not in src_vocab]
    assert dst[hf.EMBED][new].abs().sum(-1).min() > 0
    prov = read_provenance(out)
    assert prov["object"] == "qwen3-0_6B-o200k" and prov["details"]["k"] == 64 and prov["details"]["method"] == "omp"
    assert prov["details"]["tool"] == f"mergekit {transplant.MERGEKIT_VERSION} tokensurgeon"
    report = json.loads((out / "drift.json").read_text())
    spans = report["metrics"]["spans"]
    rows = drift.calibration_rows(load_upcycle_config(root / "t.toml").calibration)
    expected = _drift_by_hand(root / "source", out, rows)
    assert spans["all"]["aligned_positions"] > 0 and spans["final"]["aligned_positions"] > 0
    for name, entry in expected.items():
        assert spans[name]["aligned_positions"] == entry["aligned_positions"], name
        for key in ("top1_agreement", "source_bits_per_byte", "result_bits_per_byte"):
            if entry[key] is None:  # no aligned position or no byte in that span
                assert spans[name].get(key) is None, (name, key)
            else:
                assert spans[name][key] == pytest.approx(entry[key], rel=1e-9), (name, key)
    numbers = report["step_numbers"]
    assert numbers["rows_copied"] == len(shared)
    assert numbers["rows_copied"] + numbers["rows_approximated"] == len(dst_vocab)
    # same inputs, same bytes
    again = _run(root, "o200k_again", testing.transplant_registry_text(facts), name="again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_transplant_pads_rows_up_to_the_registry_vocab(pair):
    root, facts = pair
    out = _run(root, "padded", testing.transplant_registry_text(facts, vocab=facts["donor_vocab"] + 40), name="pad")
    state = load_file(str(out / "model.safetensors"))
    assert state[hf.EMBED].shape[0] == facts["donor_vocab"] + 40
    assert not state[hf.EMBED][facts["donor_vocab"]:].any()
    assert read_provenance(out)["details"]["padded_rows"] == 40


def test_transplant_refuses_missing_harmony_specials_and_wrong_rows(pair):
    root, facts = pair
    wrong = dict(facts, specials={**facts["specials"], "<|start|>": facts["specials"]["<|start|>"] + 1})
    with pytest.raises(UserError, match="special token '<\\|start\\|>'"):
        _run(root, "bad_special", testing.transplant_registry_text(wrong), name="bs")
    with pytest.raises(Exception, match="rows"):
        _run(root, "bad_rows", testing.transplant_registry_text(facts, vocab=facts["donor_vocab"] + 40),
             extra_transplant="pad_to_vocab = false", name="br")
    with pytest.raises(UserError, match="vocab is"):  # a source that is not the registry's donor
        _run(root, "bad_src", testing.transplant_registry_text(dict(facts, source_vocab=151936)), name="src")
