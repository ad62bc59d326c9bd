import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe import tokenizer as tk
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.errors import UserError
from vpmoe.export import export
from vpmoe.model import build_model
from vpmoe.testing.models import model_config


MULTILINGUAL = [
    "Hello, world! How are you today?",
    "Größenänderung: Straße, Äpfel und Übermut.",
    "東京は日本の首都です。人口は約1400万人。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji 🎉🚀 mixed with code: `def f(x): return x**2`\n\ttabs\r\nand CRLF   trailing",
    "numbers 1234567 and 3.14159, 2025-01-07",
]


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files, read with the safetensors library alone."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                assert key not in out, key
                out[key] = f.get_tensor(key)
    return out


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny vpMoE (a random balancing bias, so buffers are checked too) as an object and its export."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(model_config("tiny_moe"))
    with torch.no_grad():
        model.layers[1].mlp.router.expert_bias.uniform_(-1, 1)
    save_model(model, root / "object")
    return model, root / "object", export(root / "object", root / "single")


def test_export_round_trip_is_bit_exact_and_shards(tmp_path, exported):
    model, obj, single = exported
    sharded = export(obj, tmp_path / "sharded", shard_bytes=8 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (single / "model.safetensors").is_file() and (single / "tokenizer.json").is_file()
    assert json.loads((single / "tokenizer_config.json").read_text())["vocab_size"] == 201088
    ids = torch.randint(0, 201088, (1, 40))
    state = model.state_dict()
    for directory in (single, sharded):
        stored = read_safetensors(directory)  # the files, read without our loader
        assert stored.keys() == state.keys()
        for name, tensor in state.items():
            assert stored[name].dtype == tensor.dtype and torch.equal(stored[name], tensor), name
        loaded = load_model(directory)
        assert_same_weights(model, loaded)
        assert torch.equal(model(ids).logits, loaded(ids).logits)  # the same weights through the same kernels
    with pytest.raises(UserError, match="already exists"):
        export(obj, single)


def test_export_of_a_training_run_via_the_cli(tmp_path, synth_dataset):
    from vpmoe.train.config import load_train_config
    from vpmoe.train.trainer import train

    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(str(root / "configs/train/tiny_ce.toml"), [
        f"data.path={json.dumps(str(synth_dataset))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        f"model.config={json.dumps(str(root / 'configs/model/tiny_moe.toml'))}", "train.steps=2",
        "checkpoint.every=2", "optim.warmup_steps=1"])
    run = train(cfg)
    done = subprocess.run([sys.executable, "-m", "vpmoe.cli", "export", str(run), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The checkpoint read independently (DCP -> torch.save), against the exported files read with safetensors.
    dcp_to_torch_save(str(checkpoints.latest(run)), str(tmp_path / "checkpoint.pt"))
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    exported = read_safetensors(tmp_path / "out")
    assert exported.keys() == trained.keys()
    for name, tensor in trained.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert trained["layers.1.mlp.router.expert_bias"].any()  # trained buffers travel too
    assert json.loads((tmp_path / "out" / "provenance.json").read_text())["parents"][0]["kind"] == "run"
    missing = subprocess.run([sys.executable, "-m", "vpmoe.cli", "export", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_exported_tokenizer_loads_with_tokenizers_and_encodes_as_ours(exported):
    """The exported tokenizer.json, loaded by the `tokenizers` library alone, encodes multilingual text to the
    project tokenizer's ids, puts the Harmony special tokens at our ids, and decodes back to the text."""
    from tokenizers import Tokenizer

    out = exported[2]
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == tk.VOCAB_SIZE
    for text in MULTILINGUAL:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tk.encode(text), text
        assert hf.decode(ids, skip_special_tokens=False) == text
    for name, token_id in tk.special_tokens().items():
        assert hf.token_to_id(name) == token_id, name
    rendered = "<|start|>user<|message|>Grüß dich, 世界<|end|><|start|>assistant"
    assert hf.encode(rendered, add_special_tokens=False).ids == tk.encoding().encode(rendered, allowed_special="all")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] == hf.token_to_id("<|return|>") and config["pad_token_id"] == tk.EOD


def test_training_starts_from_a_sharded_export_and_keeps_the_datasets_seq_len(tmp_path, exported, synth_dataset):
    from vpmoe import distributed
    from vpmoe.train.config import load_train_config
    from vpmoe.train.trainer import Trainer

    model, obj, _ = exported
    sharded = export(obj, tmp_path / "sharded", shard_bytes=8 << 20)

    def trainer(*sets):
        cfg = load_train_config("tiny_ce", [f"data.path={json.dumps(str(synth_dataset))}",
                                            f"run.dir={json.dumps(str(tmp_path / 'run'))}",
                                            f"model.init_from={json.dumps(str(sharded))}", *sets])
        return Trainer.from_config(cfg, distributed.init("cpu"))

    assert_same_weights(model, trainer().model)  # what eval can read, training can start from
    with pytest.raises(UserError, match="was built with seq_len 512"):
        trainer("data.seq_len=1024")
