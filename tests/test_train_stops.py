"""Runs that cannot go on stop through the command line with exit code 1 and a message that says what to do:
a router collapse (and its `health.collapse_check = false` override) and a non-finite loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpmoe import config as config_io
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import save_model
from vpmoe.cli import main
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.model import build_model
from vpmoe.testing.models import model_config
from vpmoe.train.config import load_train_config
from vpmoe.train.health import COLLAPSE_CV_FRACTION

ROOT = Path(__file__).resolve().parents[1]
FORCED = 4  # experts 0..3 (one group of 4: the group limit cannot route around them)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops_data")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(6, seed=3))
    return build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=False,
                             valid_fraction=0.0))


@pytest.fixture(scope="module")
def collapsed_router(tmp_path_factory):
    """The tiny vpMoE with every MoE layer's balancing bias forcing its router onto experts 0..3."""
    cfg = model_config("tiny_moe")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for layer in cfg.moe_layers:
            model.layers[layer].mlp.router.expert_bias[:FORCED] = 10.0  # sigmoid scores lie in (0, 1)
    return save_model(model, tmp_path_factory.mktemp("collapsed") / "object"), cfg


def write_config(tmp_path, dataset, *sets: str) -> Path:
    cfg = load_train_config("tiny_ce", [
        f"data.path={json.dumps(str(dataset))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        "train.steps=2", "train.log_every=1", "checkpoint.every=1", "optim.warmup_steps=1", *sets])
    path = tmp_path / "train.toml"
    path.write_text(config_io.dumps_toml(cfg))
    return path


def test_router_collapse_stops_the_cli_with_exit_1(tmp_path, dataset, collapsed_router):
    """The stop runs end to end: a forced router (frozen, so the bias cannot rebalance it), the health threshold
    lowered to the tokens of one tiny step, the real command line in its own process."""
    obj, cfg = collapsed_router
    path = write_config(tmp_path, dataset, f"model.init_from={json.dumps(str(obj))}", 'train.freeze=["router"]',
                        "health.collapse_min_tokens=1")
    done = subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("vpmoe: stopped: router collapse at step 1: MoE layer(s) ")
    assert f"{cfg.moe_layers}" in message and "health.collapse_check = false overrides this" in message
    assert "Traceback" not in done.stderr
    # The health record that triggered it: every MoE layer on exactly the forced experts, CV at the collapse bound.
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    e, k = cfg.moe.n_experts, cfg.moe.topk
    for layer in cfg.moe_layers:
        health = record["router_layers"][f"layer_{layer}"]
        assert health["experts_active"] == FORCED and health["dead_experts"] == e - FORCED
        assert health["cv_pct"] == pytest.approx(100 * ((e - k) / k) ** 0.5, rel=1e-12)
        assert health["cv_pct"] >= COLLAPSE_CV_FRACTION * 100 * ((e - k) / k) ** 0.5
    assert checkpoints.latest(tmp_path / "run") is None  # stopped before step 1's checkpoint


def test_collapse_check_false_lets_the_same_run_finish(tmp_path, dataset, collapsed_router, capsys):
    obj, _ = collapsed_router
    path = write_config(tmp_path, dataset, f"model.init_from={json.dumps(str(obj))}", 'train.freeze=["router"]',
                        "health.collapse_min_tokens=1", "health.collapse_check=false")
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert checkpoints.latest(tmp_path / "run").name == "step_0000002"
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["router"]["experts_active_mean"] for r in log] == [FORCED, FORCED]  # still collapsed, not stopped


def test_collapse_below_the_token_threshold_is_not_judged(tmp_path, dataset, collapsed_router, capsys):
    """The default threshold (4096 tokens per interval) is above a tiny step: the same collapsed run finishes."""
    obj, _ = collapsed_router
    path = write_config(tmp_path, dataset, f"model.init_from={json.dumps(str(obj))}", 'train.freeze=["router"]',
                        "train.steps=1")
    assert main(["train", str(path)]) == 0, capsys.readouterr().err


def test_non_finite_loss_stops_the_cli_with_exit_1(tmp_path, dataset, capsys):
    """A NaN in the initial weights (a checkpoint object) makes step 1's loss NaN: exit 1, no checkpoint."""
    torch.manual_seed(0)
    model = build_model(model_config("tiny_moe"))
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")
    obj = save_model(model, tmp_path / "nan_object")
    path = write_config(tmp_path, dataset, f"model.init_from={json.dumps(str(obj))}")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vpmoe: stopped: non-finite loss or gradient at step 1: ce=nan")
    assert "Resume from the last checkpoint with a lower learning rate" in err
    assert checkpoints.latest(tmp_path / "run") is None
