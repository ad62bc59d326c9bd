"""The in-the-loop teacher (vpmoe/teacher/online.py): packed rows give each document's own states, captured block
outputs are the blocks' outputs, both teacher kinds load, and the train config's [teacher] section is strict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpmoe.artifacts.models import save_model
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.model import build_model
from vpmoe.teacher.online import PAD_BUDGET, OnlineTeacherSection, buckets, documents, load_online_teacher
from vpmoe.testing.models import model_config
from vpmoe.testing.teachers import save_tiny_teacher
from vpmoe.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


def packed_rows():
    """Two rows: [doc 0 (5 tokens) | doc 1 (4)] and [doc 0 (3) | doc 1 (4) | padding (2)]."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 199998, (2, 9), generator=g)
    doc = torch.tensor([[0] * 5 + [1] * 4, [0] * 3 + [1] * 4 + [2] * 2])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 0, 1]])
    select = torch.ones_like(ids, dtype=torch.bool)
    select[1, 7:] = False  # padding carries nothing
    select[0, 2] = False
    return ids, pos, doc, select


def per_document_reference(teacher, ids, doc, select, layer):
    """Each document fed alone from position 0: (final states, block `layer`'s outputs) at the selected positions."""
    hidden, block = [], []
    for b in range(ids.shape[0]):
        for d in doc[b].unique().tolist():
            cols = (doc[b] == d).nonzero().flatten()
            states = teacher.forward(ids[b, cols][None], torch.arange(len(cols))[None], torch.zeros_like(cols)[None],
                                     select[b, cols][None], layers=[layer])
            hidden.append(states.hidden)
            block.append(states.layers[0])
    return torch.cat(hidden), torch.cat(block)


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("online") / "gpt_oss", seed=2)


def test_a_packed_hf_teacher_forward_equals_each_document_alone(hf_teacher):
    teacher = load_online_teacher(OnlineTeacherSection(path=str(hf_teacher), dtype="float32"), Ranks())
    ids, pos, doc, select = packed_rows()
    states = teacher.forward(ids, pos, doc, select, layers=[0])
    hidden, block = per_document_reference(teacher, ids, doc, select, 0)
    assert states.hidden.shape == (int(select.sum()), teacher.hidden_size)
    # the same float32 kernels on other shapes: agreement to float32 rounding
    torch.testing.assert_close(states.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.layers[0], block, rtol=1e-5, atol=1e-5)
    # the last block's captured output, through the model's own final norm, is the final hidden state
    last = teacher.forward(ids, pos, doc, select, layers=[teacher.n_layers - 1]).layers[0]
    torch.testing.assert_close(teacher.model.model.norm(last), states.hidden, rtol=1e-6, atol=1e-6)
    assert teacher.head_weight.shape == (201088, teacher.hidden_size) and teacher.head_bias is None
    nothing = teacher.forward(ids, pos, doc, torch.zeros_like(select), layers=[0])
    assert nothing.hidden.shape == (0, teacher.hidden_size) and nothing.layers[0].shape == (0, teacher.hidden_size)


def test_a_vpmoe_teacher_gives_its_body_states(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config("tiny_dense")).eval()
    save_model(model, tmp_path / "teacher")
    teacher = load_online_teacher(OnlineTeacherSection(path=str(tmp_path / "teacher"), dtype="float32"), Ranks())
    ids, pos, doc, select = packed_rows()
    states = teacher.forward(ids, pos, doc, select, layers=[1])
    with torch.no_grad():
        expected = model.body(ids, pos, doc).hidden[select]
    torch.testing.assert_close(states.hidden, expected, rtol=0, atol=0)  # the same kernels on the same inputs
    hidden, block = per_document_reference(teacher, ids, doc, select, 1)
    torch.testing.assert_close(states.hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.layers[0], block, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        teacher.forward(ids, pos, doc, select, layers=[teacher.n_layers])


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, hf_teacher):
    path = tmp_path / "other_vocab"
    path.mkdir()
    config = json.loads((hf_teacher / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 128256}))
    with pytest.raises(UserError, match="vocabulary"):
        load_online_teacher(OnlineTeacherSection(path=str(path), dtype="float32"), Ranks())
    with pytest.raises(UserError, match="does not exist"):
        load_online_teacher(OnlineTeacherSection(path=str(tmp_path / "none"), dtype="float32"), Ranks())


def train_config(tmp_path, *sets):
    overrides = [f"run.dir={json.dumps(str(tmp_path / 'run'))}", *sets]
    return load_train_config(str(ROOT / "configs/train/tiny_ce.toml"), overrides)


def test_the_teacher_section_is_strict(tmp_path):
    for stage in ("kd_online", "opd"):
        with pytest.raises(UserError, match=f'train.stage = "{stage}" runs a teacher in the loop'):
            train_config(tmp_path, f'train.stage="{stage}"')
    with pytest.raises(UserError, match="teacher.*not train.stage"):
        train_config(tmp_path, 'teacher.path="t"')
    with pytest.raises(UserError, match="unknown key 'teacher.device'"):
        train_config(tmp_path, 'train.stage="opd"', 'teacher.path="t"', 'teacher.device="cpu"')
    with pytest.raises(UserError, match="teacher.placement"):
        train_config(tmp_path, 'train.stage="opd"', 'teacher.path="t"', 'teacher.placement="pipeline"')
    cfg = train_config(tmp_path, 'train.stage="opd"', 'teacher.path="t"', 'teacher.placement="fsdp"')
    assert cfg.teacher == OnlineTeacherSection(path="t", placement="fsdp")
    assert train_config(tmp_path).teacher is None


SHARDED_EQUALS_WHOLE = """
import sys
import torch
from vpmoe import distributed
from vpmoe.distributed import Ranks
from vpmoe.teacher.online import PAD_BUDGET, OnlineTeacherSection, buckets, documents, load_online_teacher

ranks = distributed.init("cpu")
sharded = load_online_teacher(OnlineTeacherSection(path=sys.argv[1], dtype="float32", placement="fsdp"), ranks)
whole = load_online_teacher(OnlineTeacherSection(path=sys.argv[1], dtype="float32"), Ranks())
assert sharded.placement.startswith("FSDP2") and sharded.weight_bytes < whole.weight_bytes
ids = torch.randint(0, 199998, (2, 12), generator=torch.Generator().manual_seed(ranks.rank))
# rank 1's documents (12, 7, 5 tokens) need two buckets, rank 0's (12, 12) one: rank 0 feeds an EOD to keep in step
doc = torch.tensor([[0] * 7 + [1] * 5, [0] * 12]) if ranks.rank else torch.zeros(2, 12, dtype=torch.long)
pos = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, -1) * (doc == 1) + torch.arange(12) * (doc == 0)
select = torch.ones_like(ids, dtype=torch.bool)
a = sharded.forward(ids, pos, doc, select, [0, sharded.n_layers - 1])
b = whole.forward(ids, pos, doc, select, [0, whole.n_layers - 1])
assert torch.equal(a.hidden, b.hidden) and all(torch.equal(x, y) for x, y in zip(a.layers, b.layers))
assert torch.equal(sharded.head_weight, whole.head_weight)
print("rank", ranks.rank, "equal")
distributed.finish(ranks)
"""


def test_a_teacher_sharded_over_two_ranks_equals_the_whole_teacher(tmp_path, hf_teacher):
    """torchrun, 2 CPU processes (gloo): rank 0 reads, FSDP2 shards, the other rank receives; states are bitwise
    the whole teacher's on each rank's own rows (the same CPU kernels), for a Hugging Face and a vpmoe teacher."""
    torch.manual_seed(0)
    vpmoe_teacher = save_model(build_model(model_config("tiny_dense")), tmp_path / "vpmoe_teacher")
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_EQUALS_WHOLE)
    for teacher in (hf_teacher, vpmoe_teacher):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(script), str(teacher)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rank 0 equal" in done.stdout and "rank 1 equal" in done.stdout


def test_documents_are_fed_in_buckets_of_similar_length():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        lengths = sorted(torch.randint(1, 300, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(),
                         reverse=True)
        ranges = buckets(lengths)
        assert [i for first, last in ranges for i in range(first, last)] == list(range(len(lengths)))
        for k, (first, last) in enumerate(ranges):
            padded, real = (last - first) * lengths[first], sum(lengths[first:last])
            assert last - first == 1 or padded <= PAD_BUDGET * real
            if k + 1 < len(ranges):  # greedy: the next document would have broken the budget
                assert (last - first + 1) * lengths[first] > PAD_BUDGET * (real + lengths[last])
    doc = torch.tensor([[0] * 8 + [1] * 2 + [2] * 2])  # documents of 8, 2 and 2 tokens: fed as 8 and 2 x 2
    docs = documents(torch.arange(12)[None], doc, torch.ones_like(doc, dtype=torch.bool))
    assert docs.lengths == [8, 2, 2] and docs.fed_tokens == 12 < 3 * 8
