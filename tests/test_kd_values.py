"""Offline KD by value: the first step's logged KD term and `vpmoe eval`'s held-out KL to the teacher, each
recomputed in float64 from the sidecar files, the dataset's raw tokens and an independent full-sequence forward.

The student's head is scaled up so that its distributions are peaked and differ from position to position: a
teacher row paired with the wrong position (shifted by one, another sample's) changes the KL by far more than the
tolerance (a near-uniform student at init would not show it)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.cli import main
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.indexed import IndexedReader
from vpmoe.data.loader import Loader
from vpmoe.model import build_model
from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
from vpmoe.teacher.score import score
from vpmoe.testing.models import model_config
from vpmoe.testing.teachers import save_tiny_teacher
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import train

K = 8


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """An unpacked dataset (train and valid) scored by a tiny random GPT-OSS teacher."""
    root = tmp_path_factory.mktemp("kd_values")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(12, seed=5))
    dataset = build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=False,
                                valid_fraction=0.34))
    teacher = save_tiny_teacher(root / "teacher", seed=1)
    score(ScoreConfig(TeacherSection(path=str(teacher), dataset=str(dataset), k=K, dtype="float32",
                                     splits=["train", "valid"]), ScoreSection(device="cpu", progress=False)),
          config_hash="test")
    return dataset


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(3)
    model = build_model(model_config("tiny_moe"))
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    return save_model(model, tmp_path_factory.mktemp("kd_student") / "object")


def sidecar_entries(dataset: Path, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample i's stored top-K ids and log-probs, read from the files (float16 bits widened to float64)."""
    root = dataset / split / "teacher"
    ids = np.asarray(IndexedReader(root / "topk_ids")[i]).reshape(-1, K).astype(np.int64)
    logprobs = np.asarray(IndexedReader(root / "topk_logprobs")[i]).view(np.float16).reshape(-1, K)
    return ids, logprobs.astype(np.float64)


def hand_kl(logits: torch.Tensor, ids: np.ndarray, teacher_logprobs: np.ndarray, temperature: float) -> np.ndarray:
    """Per position, float64: KL(teacher || student) over the K teacher buckets plus one tail bucket, times T^2.
    The teacher's buckets are tempered as buckets (p^(1/T), renormalized); the student is softmax(z / T)."""
    z = logits.double().numpy() / temperature
    z = z - z.max(-1, keepdims=True)
    q = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    q_top = np.take_along_axis(q, ids, -1)
    student = np.concatenate([q_top, 1.0 - q_top.sum(-1, keepdims=True)], -1)
    p_top = np.exp(teacher_logprobs)
    teacher = np.concatenate([p_top, np.clip(1.0 - p_top.sum(-1, keepdims=True), 0.0, None)], -1)
    teacher = teacher ** (1.0 / temperature)
    teacher = teacher / teacher.sum(-1, keepdims=True)
    terms = np.where(teacher > 0, teacher * (np.log(np.where(teacher > 0, teacher, 1.0)) - np.log(student)), 0.0)
    return terms.sum(-1) * temperature**2


def per_span_kl(model, dataset: Path, split: str, samples, temperature: float) -> dict[int, np.ndarray]:
    """The KL of every supervised position of `samples`, by span of its target token. A whole-sequence forward
    (no `logits_at`): the logits at input position t predict token t + 1, which the teacher scored."""
    tokens, spans = IndexedReader(dataset / split / "tokens"), IndexedReader(dataset / split / "spans")
    out: dict[int, list] = {1: [], 2: []}
    for i in samples:
        ids, sp = np.asarray(tokens[i]).astype(np.int64), np.asarray(spans[i])
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None]).logits[0]
        positions = np.flatnonzero(sp[1:] > 0)
        top_ids, top_logprobs = sidecar_entries(dataset, split, i)
        assert len(positions) == len(top_ids)
        kl = hand_kl(logits[torch.from_numpy(positions)], top_ids, top_logprobs, temperature)
        for s in out:
            out[s].append(kl[sp[positions + 1] == s])
    return {s: np.concatenate(v) for s, v in out.items()}


def test_first_step_kd_term_equals_the_hand_computation(tmp_path, scored, student):
    """Two micro-batches, span weights and a temperature: the logged term is
    kd * sum_s w_s * (sum of the step's KL over span s) / (the step's tokens of span s)."""
    weights, temperature, kd = {1: 1.0, 2: 0.5}, 2.0, 1.5
    cfg = load_train_config("tiny_ce", [
        f"data.path={json.dumps(str(scored))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        f"model.init_from={json.dumps(str(student))}", 'train.stage="kd_offline"', "loss.ce=0.5", f"loss.kd={kd}",
        f"loss.span_weights=[{weights[1]}, {weights[2]}]", f"loss.temperature={temperature}", "data.grad_accum=2",
        "train.steps=1", "train.log_every=1", "checkpoint.every=1", "optim.warmup_steps=1"])
    run = train(cfg)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])

    loader = Loader(scored, "train", 256, 1, cfg.run.seed)
    samples = [int(next(loader).sample_index[0]) for _ in range(2)]  # the step's two micro-batches
    kl = per_span_kl(load_model(student), scored, "train", samples, temperature)
    want = kd * sum(weights[s] * kl[s].sum() / len(kl[s]) for s in kl)
    assert min(len(v) for v in kl.values()) > 0
    assert logged["terms"]["kd"] == pytest.approx(want, rel=1e-5)
    for s, name in ((1, "reasoning"), (2, "final")):
        assert logged["spans"][name]["tokens"] == len(kl[s])
        assert logged["spans"][name]["kd"] == pytest.approx(kl[s].mean(), rel=1e-5)


def test_eval_heldout_teacher_kl_of_a_trained_run_equals_the_hand_computation(tmp_path, scored, student, capsys):
    """`vpmoe eval` on a run that `vpmoe train` wrote: the held-out KL per span of the valid split, against the
    hand computation with the checkpoint's weights read independently (DCP -> torch.save)."""
    cfg = load_train_config("tiny_ce", [
        f"data.path={json.dumps(str(scored))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        f"model.init_from={json.dumps(str(student))}", "train.steps=1", "checkpoint.every=1",
        "optim.warmup_steps=1"])
    run = train(cfg)
    n = 3
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(scored), "--set", "eval.max_samples=3",
                 "--set", "eval.batch_size=2", "--set", 'eval.parts=["teacher_kl"]', "--set",
                 'eval.device="cpu"']) == 0, capsys.readouterr().err
    report = json.loads((run / "eval" / "step_0000001.json").read_text())["teacher_kl"]

    dcp_to_torch_save(str(checkpoints.latest(run)), str(tmp_path / "weights.pt"))
    state = torch.load(tmp_path / "weights.pt", weights_only=False)["model"]
    model = build_model(model_config("tiny_moe"), init=False)
    model.load_state_dict(state)
    kl = per_span_kl(model.eval(), scored, "valid", range(n), 1.0)
    for s, name in ((1, "reasoning"), (2, "final")):
        assert report[name]["tokens"] == len(kl[s]) > 0
        assert report[name]["kl"] == pytest.approx(kl[s].mean(), rel=1e-5)
    everything = np.concatenate(list(kl.values()))
    assert report["all"]["tokens"] == len(everything)
    assert report["all"]["kl"] == pytest.approx(everything.mean(), rel=1e-5)
