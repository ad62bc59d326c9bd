import json
import subprocess
import sys

import pytest
import torch

from vpmoe.artifacts.models import load_model, save_model
from vpmoe.errors import UserError
from vpmoe.export import export
from vpmoe.model import build_model
from vpmoe.testing.models import model_config


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_export_round_trip_is_bit_exact_and_shards(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config("tiny_moe"))
    with torch.no_grad():
        model.layers[1].mlp.router.expert_bias.uniform_(-1, 1)  # buffers travel too
    save_model(model, tmp_path / "object")
    single = export(tmp_path / "object", tmp_path / "single")
    sharded = export(tmp_path / "object", tmp_path / "sharded", shard_bytes=8 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (single / "model.safetensors").is_file() and (single / "tokenizer.json").is_file()
    assert json.loads((single / "tokenizer_config.json").read_text())["vocab_size"] == 201088
    ids = torch.randint(0, 201088, (1, 40))
    for directory in (single, sharded):
        loaded = load_model(directory)
        assert_same_weights(model, loaded)
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    with pytest.raises(UserError, match="already exists"):
        export(tmp_path / "object", single)


def test_export_of_a_training_run_via_the_cli(tmp_path, synth_dataset):
    from vpmoe.train.config import load_train_config
    from vpmoe.train.trainer import train

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_train_config(str(root / "configs/train/tiny_ce.toml"), [
        f"data.path={json.dumps(str(synth_dataset))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        f"model.config={json.dumps(str(root / 'configs/model/tiny_moe.toml'))}", "train.steps=2",
        "checkpoint.every=2", "optim.warmup_steps=1"])
    run = train(cfg)
    done = subprocess.run([sys.executable, "-m", "vpmoe.cli", "export", str(run), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trained = load_model(run)
    exported = load_model(tmp_path / "out")
    assert_same_weights(trained, exported)
    assert json.loads((tmp_path / "out" / "provenance.json").read_text())["parents"][0]["kind"] == "run"
    missing = subprocess.run([sys.executable, "-m", "vpmoe.cli", "export", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
