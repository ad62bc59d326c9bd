import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe import config as config_io
from vpmoe.artifacts import checkpoints as checkpoint
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.errors import RunError, UserError
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY_CE = ROOT / "configs" / "train" / "tiny_ce.toml"


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(16, seed=11))
    return build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=False,
                             valid_fraction=0.0))


def config(tmp_path, dataset, name="run", **sets):
    overrides = [f"data.path={json.dumps(str(dataset))}", f"run.dir={json.dumps(str(tmp_path / name))}",
                 f"model.config={json.dumps(str(ROOT / 'configs/model/tiny_moe.toml'))}", "data.seq_len=256",
                 "train.log_every=1", "optim.warmup_steps=1"]
    overrides += [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in sets.items()]
    return load_train_config(str(TINY_CE), overrides)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir, tmp_path):
    path = checkpoint.latest(run_dir)
    out = tmp_path / f"weights_{Path(run_dir).name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_ce_overfits_a_tiny_dataset(tmp_path, small_dataset):
    run = train(config(tmp_path, small_dataset, train__steps=40, checkpoint__every=40))
    log = metrics(run)
    # The CE term sums the reasoning and final span means: 2 ln(201088) = 24.42 at init (the small initial logits
    # add a few hundredths; one span's mean, or their average, would be half)
    assert log[0]["terms"]["ce"] == pytest.approx(2 * math.log(201088), rel=1e-2)
    assert log[-1]["terms"]["ce"] < 3.0
    assert set(log[-1]["spans"]) == {"reasoning", "final"} and log[-1]["spans"]["final"]["tokens"] > 0
    assert "router" in log[-1] and log[-1]["router"]["experts_active_mean"] > 4
    saved = json.loads((run / "provenance.json").read_text())
    assert saved["kind"] == "run" and saved["parents"][0]["kind"] == "dataset"


def test_frozen_groups_do_not_change_and_get_no_optimizer_state(tmp_path, small_dataset):
    from vpmoe.model import build_model, load_model_config
    from vpmoe.optim import build_optimizer
    from vpmoe.optim.config import OptimConfig
    from vpmoe.train.parallelize import apply_freeze

    cfg = load_model_config(ROOT / "configs/model/tiny_moe.toml")
    torch.manual_seed(0)
    before = build_model(cfg).state_dict()
    run = train(config(tmp_path, small_dataset, train__steps=3, checkpoint__every=3,
                       train__freeze=["experts", "shared_expert", "dense_ffn"]))
    after = final_weights(run, tmp_path)
    for name, tensor in before.items():
        frozen = ".mlp.experts." in name or ".mlp.shared." in name or ".mlp.up" in name or ".mlp.down" in name
        if frozen:
            assert torch.equal(tensor, after[name]), name
    assert not torch.equal(before["layers.1.attn.q_a.weight"], after["layers.1.attn.q_a.weight"])
    model = build_model(cfg)
    apply_freeze(model, ["experts"])
    optimizer, _ = build_optimizer(model.named_parameters(), OptimConfig())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in in_optimizer for n, p in model.named_parameters() if ".mlp.experts." in n)
    with pytest.raises(UserError, match="matches no parameter"):
        apply_freeze(build_model(load_model_config(ROOT / "configs/model/tiny_dense.toml")), ["experts"])


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, small_dataset):
    steps = 8
    train(config(tmp_path, small_dataset, "straight", train__steps=steps, checkpoint__every=2))
    cfg_file = tmp_path / "killed.toml"
    killed = config(tmp_path, small_dataset, "killed", train__steps=steps, checkpoint__every=2)
    from vpmoe import config as config_io

    cfg_file.write_text(config_io.dumps_toml(killed))
    cmd = [sys.executable, "-m", "vpmoe.cli", "train", str(cfg_file)]
    # SIGKILLed right after its second checkpoint (step 4) is complete, whatever the machine's speed
    killed_run = subprocess.run([sys.executable, "-m", "vpmoe.testing.killed_cli", "vpmoe.artifacts.checkpoints:save",
                                 "2", *cmd[3:]], capture_output=True, text=True, cwd=tmp_path)
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr[-2000:]
    assert checkpoint.latest(tmp_path / "killed").name == "step_0000004"
    assert [m["step"] for m in metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    a, b = final_weights(tmp_path / "straight", tmp_path), final_weights(tmp_path / "killed", tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda run: [(m["step"], m["loss"]) for m in metrics(tmp_path / run)]  # noqa: E731
    assert losses("straight") == losses("killed")


def test_incomplete_checkpoints_are_never_resumed(tmp_path, small_dataset):
    run = train(config(tmp_path, small_dataset, train__steps=2, checkpoint__every=1))
    root = checkpoint.checkpoint_dir(run)
    assert checkpoint.latest(run).name == "step_0000002"
    (root / ".tmp_step_0000003").mkdir()  # a save cut off before the rename
    truncated = root / "step_0000004"
    truncated.mkdir()  # a directory without its completion marker
    (truncated / "trainer_rank0.pt").write_bytes(b"partial")
    assert checkpoint.latest(run).name == "step_0000002"


def test_non_finite_loss_stops_with_the_step(tmp_path, small_dataset, monkeypatch):
    from vpmoe.train import losses

    real = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy", lambda logits, targets: real(logits, targets) * float("nan"))
    with pytest.raises(RunError, match="non-finite loss or gradient at step 1"):
        train(config(tmp_path, small_dataset, train__steps=2, checkpoint__every=2))
    assert checkpoint.latest(tmp_path / "run") is None


def test_kd_stage_refuses_a_dataset_without_sidecar(tmp_path, small_dataset):
    cfg = config(tmp_path, small_dataset, train__stage="kd_offline", loss__kd=1.0, train__steps=2,
                 checkpoint__every=2)
    with pytest.raises(UserError, match="no teacher sidecar"):
        train(cfg)
    with pytest.raises(UserError, match="need a teacher"):
        config(tmp_path, small_dataset, loss__kd=1.0)


def test_kd_stage_overfits_the_teacher(tmp_path, small_dataset):
    import shutil

    from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
    from vpmoe.teacher.score import score
    from vpmoe.testing.teachers import save_tiny_teacher

    dataset = tmp_path / "ds"
    shutil.copytree(small_dataset, dataset)
    teacher = save_tiny_teacher(tmp_path / "teacher", seed=1)
    score(ScoreConfig(TeacherSection(path=str(teacher), dataset=str(dataset), k=8, dtype="float32", splits=["train"]),
                      ScoreSection(device="cpu", progress=False)), config_hash="test")
    run = train(config(tmp_path, dataset, train__stage="kd_offline", loss__ce=0.0, loss__kd=1.0,
                       loss__confidence_ce=0.1, train__steps=40, checkpoint__every=40, train__log_every=5))
    log = metrics(run)
    assert log[-1]["terms"]["kd"] < 0.3 * log[0]["terms"]["kd"]
    assert log[-1]["spans"]["final"]["kd"] < 1.0 and "confidence_ce" in log[-1]["terms"]


def test_two_ranks_follow_the_single_process_loss_curve(tmp_path, small_dataset):
    """torchrun, 2 CPU processes (gloo, FSDP2), micro-batch 1 each == 1 process with 2 micro-batches."""
    from vpmoe import config as config_io

    common = dict(train__steps=4, checkpoint__every=4, data__micro_batch_size=1)
    single = config(tmp_path, small_dataset, "single", data__grad_accum=2, **common)
    double = config(tmp_path, small_dataset, "double", data__grad_accum=1, **common)
    for cfg, name in ((single, "single"), (double, "double")):
        (tmp_path / f"{name}.toml").write_text(config_io.dumps_toml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", str(tmp_path / "single.toml")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vpmoe.cli", "train", str(tmp_path / "double.toml")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "double")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        # float32 sums in another order: the curves agree to 1e-4 relative
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["spans"]["final"]["tokens"] == y["spans"]["final"]["tokens"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    # A balancing bias updated from one rank's counts, or gradients not averaged over ranks, barely move the loss
    # in 4 steps: the final weights and biases tell. The biases move in steps of moe.bias_update_rate from the
    # integer routing counts of the global batch: equal as long as no routing decision flipped.
    wa, wb = final_weights(tmp_path / "single", tmp_path), final_weights(tmp_path / "double", tmp_path)
    assert wa.keys() == wb.keys()
    biases = [name for name in wa if name.endswith("expert_bias")]
    assert biases and all(wa[name].any() for name in biases)
    for name in biases:
        assert torch.equal(wa[name], wb[name]), name
    for name in wa:
        if name not in biases:
            # fp32 sums in another order, 4 steps: within 1e-3 of each tensor's largest entry (Adam's per-entry
            # normalization amplifies the rounding of near-zero embedding gradients to ~2e-4; a missing or doubled
            # gradient reduction moves entries by the learning rate, ~10%)
            torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-3 * float(wa[name].abs().max()),
                                       msg=name)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_train_configs_load(path):
    cfg = load_train_config(str(path))
    assert config_io.locate(cfg.model.config, "model").is_file()
