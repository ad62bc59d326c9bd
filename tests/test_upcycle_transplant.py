"""Step 1, the vocabulary transplant, with mergekit's tokensurgeon running for real on tiny models and tokenizers:
a tiny Qwen3 with its own small BPE, and a tiny GPT-OSS donor whose BPE has the Harmony special tokens."""

import json

import mergekit  # noqa: F401  (a test extra: a broken install fails here instead of skipping the transplant)
import pytest
import torch
from safetensors.torch import load_file

from vpmoe.errors import UserError
from vpmoe.testing import upcycle as testing
from vpmoe.upcycle import hf, transplant
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
    assert spans["all"]["aligned_positions"] > 0 and 0 <= spans["all"]["top1_agreement"] <= 1
    assert 0 < spans["final"]["source_bits_per_byte"] < 64 and 0 < spans["final"]["result_bits_per_byte"] < 64
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
