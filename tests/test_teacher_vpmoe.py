import shutil

import numpy as np
import torch

from vpmoe.artifacts.models import save_model
from vpmoe.model import build_model
from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
from vpmoe.teacher.score import score
from vpmoe.teacher.sidecar import TeacherSidecar
from vpmoe.testing.models import model_config


def test_a_vpmoe_checkpoint_can_be_the_teacher(tmp_path, synth_dataset):
    dataset = tmp_path / "ds"
    shutil.copytree(synth_dataset, dataset)
    torch.manual_seed(0)
    model = build_model(model_config("tiny_dense"))
    with torch.no_grad():
        model.head.weight.mul_(20)  # peaked distributions, as a trained teacher's
    save_model(model, tmp_path / "teacher")
    score(ScoreConfig(TeacherSection(path=str(tmp_path / "teacher"), dataset=str(dataset), k=4, dtype="float32",
                                     splits=["valid"]), ScoreSection(device="cpu", progress=False)), "test")
    sidecar = TeacherSidecar(dataset, "valid")
    tokens, spans = sidecar.data.sample(0)
    entry = sidecar.sample(0)
    # Scoring runs each document alone; compare on the sample's first document.
    eod = np.flatnonzero(tokens == 199999)
    end = int(eod[0]) if len(eod) else len(tokens)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[:end].astype(np.int64))[None]).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    first = entry.positions < end - 1
    top = logprobs[torch.from_numpy(entry.positions[first])].topk(4, dim=-1)
    np.testing.assert_array_equal(entry.topk_ids[first], top.indices.numpy())
    np.testing.assert_allclose(entry.topk_logprobs[first].astype(np.float64), top.values.numpy(), atol=2e-3)
