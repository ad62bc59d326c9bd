"""Parameter counts (architecture.md section 4 table) from the instantiated modules, the `vpmoe params` CLI, and
model-config validation."""

import json

import pytest

from vpmoe.cli import main
from vpmoe.config import shipped_dir
from vpmoe.errors import UserError
from vpmoe.model import count_params
from vpmoe.testing.models import model_config

CONFIG_DIR = shipped_dir("model")

SPEC_TABLE = {
    "vpDense0-5_28.compat": (514_654_208, 514_654_208),
    "vpDense0-5_28.real": (504_621_443, 504_621_443),
    "vpDense": (676_949_807, 676_949_807),
    "vpMoE": (6_022_557_487, 780_860_719),
}


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_counts_equal_the_spec_table(name):
    counts = count_params(model_config(name))
    assert (counts["total"], counts["active"]) == SPEC_TABLE[name]
    assert sum(counts["components"].values()) == counts["total"]
    assert sum(counts["kinds"].values()) == counts["total"]
    assert counts["object"] == name


def test_component_breakdown_of_vpmoe():
    counts = count_params(model_config("vpMoE"))
    c = counts["components"]
    assert c["embeddings"] == c["head"] == 201088 * 1024  # untied
    assert c["dense_ffn"] == 1024 * 512 + 512 + 512 * 1024 + 1024  # layer 0 only, width 512, biases
    assert c["experts"] == 79 * 256 * (2 * 128 * 1024 + 128 + 1024)
    assert c["router"] == 79 * 256 * 1024
    assert counts["kinds"]["value_residual"] == 79 and counts["kinds"]["sink"] == 80 * 8
    assert counts["kinds"]["frequency"] == 60 * 64  # GRAPE-M on local layers only
    assert counts["layers"] == {"total": 80, "local": 60, "global": 20, "moe": 79}


def test_cli_params_prints_json(capsys):
    assert main(["params", str(CONFIG_DIR / "vpMoE.toml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["total"], out["active"]) == SPEC_TABLE["vpMoE"]
    assert set(out["components"]) >= {"embeddings", "attention", "router", "experts", "shared_expert", "head"}
    assert main(["params", str(CONFIG_DIR / "vpMoE.toml"), "--set", "moe.topk=8"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] > SPEC_TABLE["vpMoE"][1]


def test_cli_params_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text((CONFIG_DIR / "tiny_real.toml").read_text().replace("n_layers = 4", "n_layers = 4\nlayers = 3"))
    assert main(["params", str(bad)]) == 2
    assert "unknown key 'model.layers'" in capsys.readouterr().err
    assert main(["params", str(CONFIG_DIR / "tiny_moe.toml"), "--set", "moe.n_groups=5"]) == 2


@pytest.mark.parametrize("override,message", [
    ("attention.n_kv_heads=3", "multiple of attention.n_kv_heads"),
    ("attention.head_dim=15", "even"),
    ("model.mode=hybrid", "must be one of"),
    ("moe.group_topk=3", "multiple of moe.group_topk"),
    ("moe.first_moe_layer=8", "below model.n_layers"),
])
def test_invalid_model_configs_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        model_config("tiny_moe", override)


def test_every_config_file_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert set(SPEC_TABLE) | {"tiny_compat", "tiny_real", "tiny_dense", "tiny_moe"} <= set(names)
    for name in names:
        cfg = model_config(name)
        assert cfg.model.name == name
        assert cfg.model.vocab_size == 201088
