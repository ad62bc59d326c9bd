"""A teacher whose vocabulary or special-token ids differ from o200k Harmony is refused before any scoring."""

import json

import pytest

from vpmoe import cli
from vpmoe import tokenizer as tk
from vpmoe.errors import UserError
from vpmoe.teacher import load
from vpmoe.testing.teachers import save_tiny_teacher
from vpmoe.tokenizer import write_hf_tokenizer


def _edit_json(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def good_teacher(tmp_path_factory):
    """A tiny GPT-OSS teacher with a real o200k Harmony tokenizer.json beside it."""
    directory = save_tiny_teacher(tmp_path_factory.mktemp("vocab") / "good", num_hidden_layers=1)
    write_hf_tokenizer(directory)
    return directory


def _copy(teacher, target, tokenizer=False):
    """The files the vocabulary check reads (no weights): config.json, generation_config.json, tokenizer.json."""
    import shutil

    target.mkdir()
    for name in ("config.json", "generation_config.json") + (("tokenizer.json",) if tokenizer else ()):
        shutil.copy(teacher / name, target / name)
    return target


def _config(tmp_path, teacher, dataset):
    path = tmp_path / "score.toml"
    path.write_text(f'[teacher]\npath = "{teacher}"\ndataset = "{dataset}"\n\n[score]\ndevice = "cpu"\n')
    return path


def test_matching_teacher_passes_with_its_tokenizer(good_teacher):
    checked = load.check_vocabulary(good_teacher)
    assert checked["vocab_size"] == tk.VOCAB_SIZE and checked["eos_token_ids"] == [tk.RETURN]
    assert "match" in checked["tokenizer"]


def test_teacher_with_another_vocabulary_is_refused(tmp_path, synth_dataset, capsys):
    small = save_tiny_teacher(tmp_path / "gpt2-sized", vocab_size=50257, num_hidden_layers=1, eos_token_id=50256,
                              pad_token_id=None, bos_token_id=None)
    with pytest.raises(UserError, match="vocabulary has 50257 ids, ours .* has 201088"):
        load.check_vocabulary(small)
    # through the CLI: exit code 2, a clear message, nothing written into the dataset
    assert cli.main(["teacher", "score", str(_config(tmp_path, small, synth_dataset))]) == 2
    assert "vocabulary has 50257 ids" in capsys.readouterr().err
    assert not (synth_dataset / "teacher.partial").exists()
    assert not (synth_dataset / "train" / "teacher").exists()


@pytest.mark.parametrize("field, value, message", [
    ("eos_token_id", 2, "eos_token_id 2"),
    ("eos_token_id", [tk.RETURN, 100], "eos_token_id 100"),
    ("bos_token_id", 1, "bos_token_id 1"),
    ("pad_token_id", 0, "pad_token_id 0"),
])
def test_teacher_with_other_special_ids_is_refused(good_teacher, tmp_path, field, value, message):
    teacher = _copy(good_teacher, tmp_path / "t")
    _edit_json(teacher / "config.json", **{field: value})
    with pytest.raises(UserError, match=f"special-token ids differ from ours \\({message}"):
        load.check_vocabulary(teacher)


def test_generation_config_ids_are_checked_too(good_teacher, tmp_path):
    teacher = _copy(good_teacher, tmp_path / "t")
    _edit_json(teacher / "generation_config.json", eos_token_id=[tk.RETURN, tk.ENDOFTEXT, 7])
    with pytest.raises(UserError, match="eos_token_id 7"):
        load.check_vocabulary(teacher)


def test_tokenizer_with_other_special_ids_is_refused(good_teacher, tmp_path):
    teacher = _copy(good_teacher, tmp_path / "t", tokenizer=True)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == "<|message|>":
            token["id"] = 200100
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UserError, match=r"<\|message\|> = 200100 \(ours 200008\)"):
        load.check_vocabulary(teacher)
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|message|>"]
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UserError, match=r"has no <\|message\|>"):
        load.check_vocabulary(teacher)


def test_tokenizer_that_encodes_text_differently_is_refused(good_teacher, tmp_path):
    teacher = _copy(good_teacher, tmp_path / "t", tokenizer=True)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = tk.encode(load.PROBE)[:2]
    names = {i: name for name, i in vocab.items() if i in (first, second)}
    vocab[names[first]], vocab[names[second]] = second, first  # two ordinary tokens of the probe swap ids
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UserError, match="encodes ordinary text differently"):
        load.check_vocabulary(teacher)


def test_teacher_naming_no_special_token_is_refused(good_teacher, tmp_path):
    teacher = _copy(good_teacher, tmp_path / "t")
    (teacher / "generation_config.json").unlink()
    _edit_json(teacher / "config.json", eos_token_id=None)
    with pytest.raises(UserError, match="cannot be checked"):
        load.check_vocabulary(teacher)
