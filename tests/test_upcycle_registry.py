"""The registry of checkpoint objects and the step configs: what loads, what is refused."""

from pathlib import Path

import pytest

from vpmoe.errors import UserError
from vpmoe.model.params import count_params
from vpmoe.upcycle.config import load_upcycle_config
from vpmoe.upcycle.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "configs" / "upcycle" / "objects.toml"


def test_project_registry_is_the_rung_ladder_with_the_spec_shapes():
    reg = load_registry(REGISTRY)
    assert reg.chain("vpMoE") == ["qwen3-0_6B", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "vpDense0-5_28.real",
                                  "vpDense", "vpMoE"]
    steps = [reg.get(n).step for n in reg.chain("vpMoE")]
    assert steps == ["", "transplant", "surgery", "morph", "expand", "granular"]
    donor = reg.get("qwen3-0_6B").hf
    assert (donor.layers, donor.hidden, donor.heads, donor.kv_heads, donor.head_dim, donor.vocab) == \
        (28, 1024, 16, 8, 128, 151936)
    o200k = reg.get("qwen3-0_6B-o200k").hf
    assert o200k.vocab == 201088 and o200k.special_tokens["<|start|>"] == 200006
    assert o200k.special_tokens["<|return|>"] == 200002 and o200k.special_tokens["<|endoftext|>"] == 199999
    totals = {name: count_params(reg.get(name).model_config())["total"]
              for name in ("vpDense0-5_28.compat", "vpDense0-5_28.real", "vpDense", "vpMoE")}
    assert totals == {"vpDense0-5_28.compat": 514_654_208, "vpDense0-5_28.real": 504_621_443,
                      "vpDense": 676_949_807, "vpMoE": 6_022_557_487}


@pytest.mark.parametrize("name", ["transplant", "surgery", "morph", "expand", "granular"])
def test_step_configs_name_registry_edges(name):
    cfg = load_upcycle_config(ROOT / "configs" / "upcycle" / f"{name}.toml")
    reg = load_registry(REGISTRY)
    target = reg.get(cfg.upcycle.target)
    assert cfg.upcycle.step == name == target.step and target.parent == cfg.upcycle.source


GOOD = '''
[objects.a]
kind = "hf"
parent = ""
step = ""
[objects.a.hf]
architecture = "Qwen3ForCausalLM"
layers = 2
hidden = 8
heads = 2
kv_heads = 1
head_dim = 4
intermediate = 16
vocab = 32

[objects.b]
kind = "vpmoe"
parent = "a"
step = "surgery"
model_config = "MODEL"
'''


HF_C = '''
[objects.c]
kind = "hf"
parent = "a"
step = "transplant"
[objects.c.hf]
architecture = "Qwen3ForCausalLM"
layers = 2
hidden = 8
heads = 2
kv_heads = 1
head_dim = 4
intermediate = 16
vocab = 32
'''


def _write(tmp_path, text):
    model = ROOT / "configs" / "model" / "tiny_compat.toml"
    path = tmp_path / "objects.toml"
    path.write_text(text.replace("MODEL", model.as_posix()))
    return path


def test_a_small_registry_loads(tmp_path):
    reg = load_registry(_write(tmp_path, GOOD))
    assert reg.chain("b") == ["a", "b"] and len(reg.sha256) == 64
    with pytest.raises(UserError, match="no object named"):
        reg.get("c")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace('step = "surgery"', 'step = "morph"'), "turns a vpmoe object"),
    (lambda t: t.replace('parent = "a"', 'parent = "z"'), "unknown parent"),
    (lambda t: t.replace('step = "surgery"', 'step = ""'), "both a parent and a step"),
    (lambda t: t.replace('step = "surgery"', 'step = "melt"'), "step must be one of"),
    (lambda t: t.replace("vocab = 32", "vocab = 32\ncolour = 1"), "unknown key"),
    (lambda t: t.replace("layers = 2\n", ""), "missing key"),
    (lambda t: t.replace('kind = "vpmoe"', 'kind = "onnx"'), "kind must be"),
    (lambda t: t.replace('model_config = "MODEL"', 'model_config = "nope.toml"'), "not found"),
    (lambda t: t + '\n[objects.b.hf]\narchitecture = "x"\n', "no \\[hf\\] table"),
    (lambda t: t.replace('parent = ""\nstep = ""', 'parent = "c"\nstep = "transplant"') + HF_C, "cycle"),
    (lambda t: t.replace('step = "surgery"', 'step = "surgery"\nsha256 = "abc"'), "sha256"),
])
def test_bad_registries_are_refused(tmp_path, edit, match):
    with pytest.raises(UserError, match=match):
        load_registry(_write(tmp_path, edit(GOOD)))


def test_step_config_rejects_unknown_keys_and_steps(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[upcycle]\nstep = "morph"\nsource = "a"\ntarget = "b"\ninput = "i"\noutput = "o"\nspeed = 1\n')
    with pytest.raises(UserError, match="unknown key 'upcycle.speed'"):
        load_upcycle_config(path)
    path.write_text('[upcycle]\nstep = "melt"\nsource = "a"\ntarget = "b"\ninput = "i"\noutput = "o"\n')
    with pytest.raises(UserError, match="must be one of"):
        load_upcycle_config(path)


@pytest.mark.parametrize("step, overrides, match", [
    ("morph", ["morph.method=blockwise"], "needs fit_data.dataset"),
    ("granular", ["granular.fit_router=true", "upcycle.stream=false"], "needs fit_data.dataset"),
    ("transplant", ["heal.config=heal_real"], "does not train"),
    ("morph", ["morph.trainable=['tpa', 'norms']"], "unknown group 'norms'"),
    ("morph", ["morph.workers=0"], "morph.workers must be at least 1"),
    ("morph", ["morph.workers=2", "morph.device=cuda"], "set morph.workers = 1 on CUDA"),
])
def test_fit_heal_and_stream_settings_are_checked_when_the_config_loads(step, overrides, match):
    with pytest.raises(UserError, match=match):
        load_upcycle_config(ROOT / "configs" / "upcycle" / f"{step}.toml", overrides)


def test_parallel_block_fits_are_cpu_only():
    from vpmoe.upcycle.config import MorphSection

    with pytest.raises(ValueError, match="morph.workers must be at least 1"):
        MorphSection(workers=0).validate()
    with pytest.raises(ValueError, match=r"morph.workers = 2 .* morph.device is \"cuda\": set morph.workers = 1"):
        MorphSection(workers=2, device="cuda").validate()
    MorphSection(workers=2).validate()
    MorphSection(workers=1, device="cuda").validate()
    assert load_upcycle_config(ROOT / "configs" / "upcycle" / "morph.toml").morph.workers == 1


def test_morph_is_block_wise_exactly_when_fit_data_is_given():
    path = ROOT / "configs" / "upcycle" / "morph.toml"
    assert not load_upcycle_config(path).blockwise_morph
    assert load_upcycle_config(path, ["fit_data.dataset=data/datasets/calibration"]).blockwise_morph
    assert not load_upcycle_config(path, ["fit_data.dataset=x", "morph.method=mapped"]).blockwise_morph
