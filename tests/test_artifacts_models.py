"""Checkpoint objects on disk (vpmoe.artifacts.models): safetensors + config.json round trip, shape mismatches named."""

import json

import pytest
import torch

from vpmoe.artifacts.models import load_model, load_weights, save_model
from vpmoe.artifacts.models import model_config as stored_config
from vpmoe.errors import UserError
from vpmoe.model import Transformer
from vpmoe.testing.models import model_config


def _saved_model(path):
    """A tiny MoE with nonzero expert biases, saved at `path`: (its config, the model)."""
    cfg = model_config("tiny_moe", "model.vocab_size=97")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.update_expert_bias(torch.randint(0, 20, (len(cfg.moe_layers), cfg.moe.n_experts)))
    save_model(model, path)
    return cfg, model


def test_round_trip_keeps_config_weights_buffers_and_logits(tmp_path):
    cfg, model = _saved_model(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert stored_config(tmp_path / "ckpt") == cfg
    loaded = load_model(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.expert_biases().abs().sum() > 0
    ids = torch.randint(0, 97, (2, 10))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loading_in_bf16_allocates_bf16_and_equals_loading_in_fp32_then_casting(tmp_path):
    cfg, model = _saved_model(tmp_path / "ckpt")
    got = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    want = model.cast_(torch.bfloat16).state_dict()  # the reference: fp32 values rounded once by a plain cast
    assert {str(t.dtype) for t in got.state_dict().values()} == {"torch.bfloat16", "torch.float32"}
    for name, tensor in got.state_dict().items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name


def test_loading_into_another_shape_names_the_first_mismatched_tensor(tmp_path):
    save_model(Transformer(model_config("tiny_real", "model.vocab_size=97")), tmp_path)
    narrow = Transformer(model_config("tiny_real", "model.vocab_size=97", "ffn.dense_width=16"))
    with pytest.raises(UserError, match=r"'layers\.0\.mlp\.up\.weight' has shape \[32, 64\] in the checkpoint "
                                        r"but \[16, 64\]"):
        load_weights(narrow, tmp_path)
    compat = Transformer(model_config("tiny_compat", "model.vocab_size=97"))
    with pytest.raises(UserError, match=r"'layers\.0\.attn\.q_proj\.weight' of the model is missing"):
        load_weights(compat, tmp_path)
    shallow = Transformer(model_config("tiny_real", "model.vocab_size=97", "model.n_layers=3"))
    with pytest.raises(UserError, match=r"'layers\.3\.[a-z_.]+' of the checkpoint does not exist"):
        load_weights(shallow, tmp_path)


def test_bad_config_json_is_a_user_error(tmp_path):
    save_model(Transformer(model_config("tiny_real", "model.vocab_size=97")), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model"]["surprise"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="unknown key 'model.surprise'"):
        stored_config(tmp_path)
