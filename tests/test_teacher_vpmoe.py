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
    reference = logprobs[torch.from_numpy(entry.positions[first])]
    top = reference.topk(5, dim=-1)
    ids = torch.from_numpy(entry.topk_ids[first].astype(np.int64))
    # the stored log-probs are the reference's at the stored ids (float16 rounding), and those ids are a top 4
    at_ids = reference.gather(1, ids)
    np.testing.assert_allclose(entry.topk_logprobs[first].astype(np.float64), at_ids.numpy(), rtol=2**-10, atol=1e-5)
    assert (at_ids >= top.values[:, 3:4] - 1e-4).all()
    # the ids exactly where no two of the top 5 lie within fp32 noise of each other (the scorer's batched forward
    # rounds differently from this one)
    clear = (top.values[:, :-1] - top.values[:, 1:]).min(dim=1).values > 1e-4
    assert torch.equal(ids[clear], top.indices[clear, :4]) and clear.float().mean() > 0.9
