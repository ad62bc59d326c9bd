"""Parameter routing on the real tiny model configs; the schedule; config validation."""

import math
import re
from pathlib import Path

import pytest

from vpmoe.errors import UserError
from vpmoe.optim import OptimConfig, build_optimizer, build_scheduler
from vpmoe.optim.schedule import WarmupCosine
from vpmoe.testing.optim import module_from_shapes, small_model_shapes

# The intended group of every parameter, written from system.md section 5 (independently of naming.py's code).
INTENDED = [
    (r"^embed\.weight$", "adamw_decay"),
    (r"^head\.weight$", "adamw_decay"),
    (r"^layers\.\d+\.mlp\.router\.weight$", "adamw_decay"),
    (r"(^|\.)(final_norm|attn_norm|mlp_norm|q_norm|k_norm)\.weight$", "adamw_no_decay"),
    (r"(\.bias|_bias)$", "adamw_no_decay"),
    (r"\.attn\.sinks$", "adamw_no_decay"),
    (r"\.attn\.grape_log_freq$", "adamw_no_decay"),
    (r"^layers\.\d+\.value_residual_logit$", "adamw_no_decay"),
    (r"^layers\.\d+\.mlp\.experts\.(up|down)$", "normuon"),
    (r"^layers\.\d+\.attn\.(q_a|q_b|k_a|k_b|v_a|v_b|q_proj|k_proj|v_proj|o_proj)\.weight$", "normuon"),
    (r"^layers\.\d+\.mlp\.(shared\.)?(up|down)\.weight$", "normuon"),
]


def _intended(name: str) -> str:
    hits = {g for pat, g in INTENDED if re.search(pat, name)}
    assert len(hits) == 1, (name, hits)
    return hits.pop()


def _tiny_model(cfg_name: str):
    from vpmoe.model import build_model, load_model_config

    root = Path(__file__).resolve().parents[1]
    return build_model(load_model_config(root / "configs" / "model" / f"{cfg_name}.toml"), device="meta")


@pytest.mark.parametrize("cfg_name", ["tiny_moe", "tiny_real", "tiny_compat", "tiny_dense"])
def test_every_parameter_of_tiny_models_lands_in_its_group(cfg_name):
    model = _tiny_model(cfg_name)
    cfg = OptimConfig(weight_decay=0.1, adam_weight_decay=0.05)
    opt, table = build_optimizer(model.named_parameters(), cfg)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)  # every parameter is in exactly one group
    for name, p in names.items():
        group = by_id[id(p)]
        assert group["group"] == _intended(name), name
        if group["group"] == "normuon":
            assert group["family"] == "normuon" and group["weight_decay"] == 0.1
            assert p.ndim == (3 if ".experts." in name else 2), name
        elif group["group"] == "adamw_decay":
            assert group["family"] == "adamw" and group["weight_decay"] == 0.05
        else:
            assert group["family"] == "adamw" and group["weight_decay"] == 0.0
    assert table.splitlines()[0] == "optimizer routing:"


def test_tiny_moe_counts():
    model = _tiny_model("tiny_moe")
    opt, table = build_optimizer(model.named_parameters(), OptimConfig())
    groups = {g["group"]: g["params"] for g in opt.param_groups}
    banks = [p for p in groups["normuon"] if p.ndim == 3]
    n_layers, first_moe = 8, 1
    assert len(banks) == 2 * (n_layers - first_moe)
    assert all(p.shape[0] == 32 for p in banks)
    rows = {line.split()[0]: line for line in table.splitlines()[3:]}
    for kind in ("matrix", "expert_bank", "embedding", "head", "router", "norm", "bias", "sink", "value_residual",
                 "frequency"):
        assert kind in rows, kind
    assert rows["expert_bank"].split()[3] == str(2 * (n_layers - first_moe))
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable parameters: {total:,}" in table


def test_unknown_or_misshapen_parameters_are_errors():
    shapes = small_model_shapes()
    shapes["layers.0.attn.mystery"] = (3,)
    shapes["layers.1.mlp.experts.down"] = (4, 24)  # a bank must be 3-D
    with pytest.raises(UserError) as e:
        build_optimizer(module_from_shapes(shapes).named_parameters(), OptimConfig())
    assert "layers.0.attn.mystery" in str(e.value) and "layers.1.mlp.experts.down" in str(e.value)


def test_row_blocks_validation():
    model = module_from_shapes(small_model_shapes())
    with pytest.raises(UserError):
        build_optimizer(model.named_parameters(), OptimConfig(), row_blocks={"layers.0.attn.q_b.weight": (8, 4)})
    with pytest.raises(UserError):
        build_optimizer(model.named_parameters(), OptimConfig(), row_blocks={"nope.weight": (8, 8)})
    with pytest.raises(UserError):
        build_optimizer(model.named_parameters(), OptimConfig(), row_blocks={"layers.0.attn.sinks": (2, 2)})


def test_schedule_values():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    vals = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert WarmupCosine(0, 100, 0.0)(0) == 1.0


def test_scheduler_drives_both_families_and_resumes():
    model = module_from_shapes(small_model_shapes())
    cfg = OptimConfig(lr_matrix=0.02, lr_adam=0.003, warmup_steps=3, min_lr_ratio=0.2)
    opt, _ = build_optimizer(model.named_parameters(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    fn = WarmupCosine(3, 20, 0.2)
    for t in range(8):
        lrs = {g["group"]: g["lr"] for g in opt.param_groups}
        assert lrs["normuon"] == pytest.approx(0.02 * fn(t))
        assert lrs["adamw_decay"] == pytest.approx(0.003 * fn(t)) == pytest.approx(lrs["adamw_no_decay"])
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, _ = build_optimizer(model.named_parameters(), cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=20)
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    assert {g["group"]: g["lr"] for g in opt2.param_groups}["normuon"] == pytest.approx(0.02 * fn(8))


def test_config_validation_and_toml_section(tmp_path):
    with pytest.raises(ValueError):
        OptimConfig(momentum=1.0).validate()
    with pytest.raises(ValueError):
        OptimConfig(ns_steps=6).validate()
    import dataclasses

    from vpmoe import config as config_io

    @dataclasses.dataclass
    class Schema:
        optim: OptimConfig

    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr_matrix = 0.002\nwarmup_steps = 100\northo_dtype = \"float32\"\n")
    cfg = config_io.load(path, Schema)
    assert cfg.optim.lr_matrix == 0.002 and cfg.optim.warmup_steps == 100 and cfg.optim.momentum == 0.95
    path.write_text("[optim]\nbeta2 = 1.5\n")
    with pytest.raises(UserError):
        config_io.load(path, Schema)
