"""Issue 18, item 3: every reader checks each `.bin` against its `.idx` and the manifest; `vpmoe data verify`.

Expected sizes come from the undamaged files themselves (what the index describes), not from the reader."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from vpmoe import config
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.indexed import IndexedReader
from vpmoe.data.inspect import inspect
from vpmoe.data.loader import Loader, SplitReader
from vpmoe.data.verify import verify
from vpmoe.errors import UserError
from vpmoe.teacher import score as score_mod
from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
from vpmoe.teacher.sidecar import TeacherSidecar
from vpmoe.testing.teachers import save_tiny_teacher


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    src = synthetic.write_jsonl(root / "a.jsonl", synthetic.records(24, seed=3))
    return build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=512, pack=True,
                             valid_fraction=0.25))


@pytest.fixture(scope="module")
def scored(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes_scored")
    data = shutil.copytree(dataset, root / "ds")
    teacher = save_tiny_teacher(root / "teacher", seed=1)
    cfg = ScoreConfig(TeacherSection(path=str(teacher), dataset=str(data), k=8, dtype="float32"),
                      ScoreSection(device="cpu", batch_tokens=1024, head_chunk=256, shard_samples=4, progress=False))
    score_mod.score(cfg, config.config_hash(cfg))
    return data


def damaged(src, tmp_path, name, keep=None, append=b""):
    """A copy of dataset `src` whose file `name` keeps its first `keep` bytes (or gets `append`ed bytes)."""
    data = shutil.copytree(src, tmp_path / "copy")
    path = data / name
    original = path.stat().st_size
    with open(path, "r+b") as f:
        if keep is not None:
            f.truncate(keep(original))
        f.seek(0, 2)
        f.write(append)
    return data, path, original


@pytest.mark.parametrize("name, keep, append, state", [
    ("train/tokens.bin", lambda n: n // 2, b"", "truncated"),
    ("train/tokens.bin", lambda n: n - 4, b"", "truncated"),  # a cut inside the last sample
    ("train/spans.bin", lambda n: n // 3, b"", "truncated"),
    ("valid/tokens.bin", None, b"\0" * 8, "too long"),
])
def test_a_bin_that_does_not_match_its_index_is_refused(dataset, tmp_path, name, keep, append, state):
    data, path, original = damaged(dataset, tmp_path, name, keep, append)
    split = name.split("/")[0]
    message = f"{path} is {path.stat().st_size} bytes, but {path.stem}.idx describes"
    for open_it in (lambda: SplitReader(data, split), lambda: Loader(data, split, 512, 1, seed=0),
                    lambda: inspect(str(data), split=split, sample=0)):
        with pytest.raises(UserError) as e:
            open_it()
        assert message in str(e.value) and f", {original} bytes: the file is {state}" in str(e.value)


def test_a_damaged_index_is_refused(dataset, tmp_path):
    data, idx, original = damaged(dataset, tmp_path, "train/tokens.idx", keep=lambda n: n - 8)
    with pytest.raises(UserError, match=f"{idx} is {original - 8} bytes, but its header describes .* which take "
                                        f"{original}: the index is truncated or damaged"):
        SplitReader(data, "train")

    shutil.copy(dataset / "train" / "tokens.idx", idx)
    n = struct.unpack("<Q", idx.read_bytes()[18:26])[0]  # the header: magic 9, version 8, dtype 1, count 8
    raw = bytearray(idx.read_bytes())
    raw[34 + 4 * n + 8] ^= 0x40  # the second sample's byte offset
    idx.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{idx}: its byte offsets do not follow from its sequence lengths"):
        SplitReader(data, "train")


def test_split_files_that_are_not_the_manifests_are_refused(dataset, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "copy")
    for name in ("tokens.bin", "tokens.idx", "spans.bin", "spans.idx"):
        shutil.copy(data / "valid" / name, data / "train" / name)  # consistent files, but the valid split's
    manifest = json.loads((data / "manifest.json").read_text())["splits"]
    valid = np.fromfile(dataset / "valid" / "tokens.bin", dtype=np.int32)
    with pytest.raises(UserError) as e:
        SplitReader(data, "train")
    assert f"tokens.idx holds {manifest['valid']['samples']} samples, {len(valid)} tokens, but the manifest records " \
           f"{manifest['train']['samples']} samples, {manifest['train']['tokens']} tokens" in str(e.value)


@pytest.mark.parametrize("name", ["target_logprob", "topk_ids", "topk_logprobs"])
def test_a_truncated_sidecar_file_is_refused(scored, tmp_path, name):
    data, path, original = damaged(scored, tmp_path, f"train/teacher/{name}.bin", keep=lambda n: n * 47 // 100)
    with pytest.raises(UserError) as e:
        TeacherSidecar(data, "train")
    assert f"{path} is {original * 47 // 100} bytes, but {name}.idx describes" in str(e.value)
    assert f", {original} bytes: the file is truncated" in str(e.value)


def test_verify_rehashes_every_recorded_file(scored, tmp_path, capsys):
    manifest = json.loads((scored / "manifest.json").read_text())
    names = [f"{s}/{n}.{e}" for s in ("train", "valid") for n in ("tokens", "spans") for e in ("bin", "idx")]
    sidecar = [f"{s}/teacher/{n}.{e}" for s in ("train", "valid")
               for n in ("topk_ids", "topk_logprobs", "target_logprob") for e in ("bin", "idx")]
    for name in names:
        assert manifest["files"][name] == {"bytes": (scored / name).stat().st_size,
                                           "sha256": hashlib.sha256((scored / name).read_bytes()).hexdigest()}
    for name in sidecar:
        split, _, file = name.split("/")
        assert manifest["teacher"]["splits"][split]["files"][file]["sha256"] == \
            hashlib.sha256((scored / name).read_bytes()).hexdigest()
    verify(scored)
    assert f"verified {scored}: {len(names) + len(sidecar)} files" in capsys.readouterr().out

    for i, name in enumerate(["train/tokens.bin", "valid/teacher/topk_logprobs.bin"]):
        data = shutil.copytree(scored, tmp_path / f"copy{i}")
        raw = bytearray((data / name).read_bytes())
        raw[len(raw) // 2] ^= 1  # same size: only the hash sees it
        (data / name).write_bytes(bytes(raw))
        SplitReader(data, "train")
        with pytest.raises(UserError, match=f"1 of {len(names) + len(sidecar)} files differ from the manifest: "
                                            f"{name} has another sha256"):
            verify(data)

    data = shutil.copytree(scored, tmp_path / "missing")
    (data / "valid" / "spans.bin").unlink()
    with pytest.raises(UserError, match=f"{data / 'valid' / 'spans.bin'} is missing"):
        verify(data)


def test_verify_of_a_manifest_without_hashes_checks_sizes_and_says_so(dataset, tmp_path, capsys):
    data = shutil.copytree(dataset, tmp_path / "old")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["files"]  # as vpmoe wrote manifests before it recorded them
    (data / "manifest.json").write_text(json.dumps(manifest))
    verify(data)
    assert "records no file hashes" in capsys.readouterr().out
    with open(data / "train" / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="tokens.bin is 100 bytes"):
        verify(data)


def test_readers_see_the_same_samples_as_before(dataset):
    """The checks change nothing for a sound dataset: samples read back as the raw files hold them."""
    reader = IndexedReader(dataset / "train" / "tokens")
    raw = np.fromfile(dataset / "train" / "tokens.bin", dtype=np.int32)
    assert np.array_equal(np.concatenate([reader[i] for i in range(len(reader))]), raw)


def test_training_on_a_truncated_sidecar_is_refused_through_the_cli(scored, tmp_path):
    """The issue's case: `target_logprob.bin` cut to 47% trained with exit 0. Now one line, exit 2, and the run
    directory the refused run would have used is not left behind."""
    data, path, original = damaged(scored, tmp_path, "train/teacher/target_logprob.bin", keep=lambda n: n * 47 // 100)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "vpmoe.cli", "train", "tiny_kd", "--set",
                        f"data.path={json.dumps(str(data))}", "--set", f"run.dir={json.dumps(str(run))}",
                        "--set", "train.steps=1"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"vpmoe: error: {path} is {original * 47 // 100} bytes")
    assert not run.exists()
