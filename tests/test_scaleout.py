"""The trainer on several gloo processes (torchrun, CPU, a 2-layer tiny vpMoE): 4 ranks with dp_shard 2 x ep 2 (stage
ce) and 2 ranks with ep 2 (stage kd_offline) follow the single-process loss and grad-norm curves, and a checkpoint
of the 4 ranks resumes on 1 rank and on 2 ranks with ep = 1 (two HSDP replicas) with the same next step; `vpmoe
export` reads it. Each torchrun start costs seconds: the runs are shared."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (a test extra: the teacher, the export's tokenizer.json; a broken install fails)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe import config as config_io
from vpmoe.artifacts import checkpoints
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write_config(root: Path, dataset: Path, name: str, **sets) -> Path:
    overrides = [f"data.path={json.dumps(str(dataset))}", f"run.dir={json.dumps(str(root / name))}",
                 f"model.config={json.dumps(str(root / 'model.toml'))}", "train.log_every=1", "optim.warmup_steps=1",
                 f"train.steps={STEPS}", "checkpoint.every=2", "data.micro_batch_size=1"]
    overrides += [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in sets.items()]
    path = root / f"{name}.toml"
    path.write_text(config_io.dumps_toml(load_train_config("tiny_ce", overrides)))
    return path


def _train(config: Path, ranks: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "vpmoe.cli", "train", str(config)], capture_output=True, text=True,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_from(source: Path, run: Path) -> None:
    """A new run directory that holds `source` (a checkpoint of another layout) as its latest checkpoint."""
    shutil.copytree(source, checkpoints.checkpoint_dir(run) / source.name)


def _setup(root: Path) -> Path:
    """A small dataset and the 2-layer model config under `root`; returns the dataset."""
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(16, seed=11))
    dataset = build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=False,
                                valid_fraction=0.0))
    model = (ROOT / "configs/model/tiny_moe.toml").read_text()
    assert "n_layers = 8" in model
    (root / "model.toml").write_text(model.replace("n_layers = 8", "n_layers = 2"))  # layer 0 dense, 1 MoE
    return dataset


def _assert_same_curve(single: list[dict], parallel: list[dict]) -> None:
    assert [m["step"] for m in single] == [m["step"] for m in parallel] == list(range(1, STEPS + 1))
    for a, b in zip(single, parallel):
        # float32 sums in another order (over ranks, all-to-all): 1e-4 relative
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["terms"].keys() == a["terms"].keys()
        assert b["spans"]["final"]["tokens"] == a["spans"]["final"]["tokens"]
        assert b["router"]["experts_active_mean"] == a["router"]["experts_active_mean"]  # global routing counts
    assert single[-1]["loss"] < single[0]["loss"]  # it trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    dataset = _setup(root)
    # the same global batch of 4 rows per step: 1 rank x 4 micro-batches, 4 ranks x 1, 2 ranks x 2
    _train(_write_config(root, dataset, "single", data__grad_accum=4), 1)
    _train(_write_config(root, dataset, "ep", parallel__ep=2), 4)
    written = checkpoints.checkpoint_dir(root / "ep") / "step_0000002"
    _resume_from(written, root / "resume_1")
    _train(_write_config(root, dataset, "resume_1", data__grad_accum=4), 1)
    _resume_from(written, root / "resume_2")
    _train(_write_config(root, dataset, "resume_2", data__grad_accum=2, parallel__dp_replicate=2), 2)  # HSDP
    return root


def test_dp_shard_2_x_ep_2_follows_the_single_process_curve(runs):
    _assert_same_curve(_metrics(runs / "single"), _metrics(runs / "ep"))


def test_kd_offline_with_ep_2_follows_the_single_process_curve(tmp_path):
    from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
    from vpmoe.teacher.score import score
    from vpmoe.testing.teachers import save_tiny_teacher

    dataset = _setup(tmp_path)
    teacher = save_tiny_teacher(tmp_path / "teacher", seed=1)
    score(ScoreConfig(TeacherSection(path=str(teacher), dataset=str(dataset), k=8, dtype="float32", splits=["train"]),
                      ScoreSection(device="cpu", progress=False)), config_hash="test")
    kd = dict(train__stage="kd_offline", loss__ce=0.0, loss__kd=1.0, loss__confidence_ce=0.1)
    _train(_write_config(tmp_path, dataset, "single", data__grad_accum=2, **kd), 1)
    _train(_write_config(tmp_path, dataset, "ep", parallel__ep=2, **kd), 2)
    _assert_same_curve(_metrics(tmp_path / "single"), _metrics(tmp_path / "ep"))


@pytest.mark.parametrize("run", ["resume_1", "resume_2"])
def test_checkpoint_of_4_ranks_resumes_on_another_layout(runs, run):
    step = _metrics(runs / run)
    assert [m["step"] for m in step] == [STEPS]
    reference = _metrics(runs / "ep")[-1]
    assert step[0]["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert step[0]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_export_reads_the_expert_parallel_checkpoint(runs, tmp_path):
    from vpmoe.artifacts.weights import iter_tensors
    from vpmoe.export import export

    out = export(runs / "ep", tmp_path / "export")
    dcp_to_torch_save(str(checkpoints.latest(runs / "ep")), str(tmp_path / "saved.pt"))
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)["model"]
    exported = dict(iter_tensors(out))
    assert exported["layers.1.mlp.experts.up"].shape[0] == 32  # whole banks, not one rank's experts
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_expert_parallel_in_bf16_trains_like_data_parallel(tmp_path):
    """NCCL, bf16 gathers over fp32 masters, FlexAttention + grouped GEMM, compiled blocks: ep 2 over 2 GPUs follows
    dp 2 (the experts' sums run in another grouping in bf16: 2e-2 relative)."""
    dataset = _setup(tmp_path)
    gpu = dict(train__device="cuda", train__precision="bf16", train__kernels="fast", train__compile="on")
    _train(_write_config(tmp_path, dataset, "dp", **gpu), 2)
    _train(_write_config(tmp_path, dataset, "ep", parallel__ep=2, **gpu), 2)
    dp, ep = _metrics(tmp_path / "dp"), _metrics(tmp_path / "ep")
    assert [m["step"] for m in ep] == list(range(1, STEPS + 1))
    for a, b in zip(dp, ep):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)


def _bad_layout_run(tmp_path: Path, ranks: int) -> subprocess.CompletedProcess:
    config = _write_config(tmp_path, _setup(tmp_path), "bad", parallel__ep=3)  # 3 divides neither 1 nor 2 ranks
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "vpmoe.cli", "train", str(config)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_a_bad_layout_exits_2_with_one_line_in_a_single_process(tmp_path):
    done = _bad_layout_run(tmp_path, 1)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "vpmoe: error: parallel.dp_replicate x parallel.dp_shard x parallel.ep = 1 x 0 (auto: 1 // 3) x 3 must equal "
        "the world size, 1 (torchrun's --nnodes x --nproc_per_node; 1 for a single process)"], done.stderr


def test_a_bad_layout_under_torchrun_is_reported_once(tmp_path):
    """Every rank meets the error; rank 0 says it, and torchrun exits 1 (its own code) with its failure report."""
    done = _bad_layout_run(tmp_path, 2)
    assert done.returncode == 1
    assert done.stderr.count("vpmoe: error:") == 1, done.stderr
    assert "parallel.ep = 1 x 0 (auto: 2 // 3) x 3 must equal the world size, 2 (" in done.stderr
