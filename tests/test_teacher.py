"""`vpmoe teacher score` end to end with a tiny random GPT-OSS teacher (vocabulary 201088) on a small dataset."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vpmoe import config
from vpmoe import tokenizer as tk
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.inspect import inspect
from vpmoe.data.loader import SplitReader
from vpmoe.errors import UserError
from vpmoe.artifacts.files import file_sha256
from vpmoe.spans import NAMES as SPAN_NAMES
from vpmoe.teacher import score as score_mod
from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
from vpmoe.teacher.sidecar import TeacherSidecar, sidecar_dir
from vpmoe.testing.teachers import save_tiny_teacher

K = 64
SHARD = 2  # samples per shard: several shards per split


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-gpt-oss", seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An unscored packed dataset: a handful of samples per split (do not score it in place: copy it)."""
    root = tmp_path_factory.mktemp("teacher_data")
    inputs = synthetic.write_corpus(root / "src", 18, shards=1, seed=11)
    return build(DataSection(inputs=[str(p) for p in inputs], format="synth", out=str(root / "ds"), seq_len=512,
                             pack=True, valid_fraction=0.25))


def make_config(teacher: Path, data: Path, **score) -> ScoreConfig:
    values = dict(device="cpu", batch_tokens=1024, head_chunk=256, shard_samples=SHARD, progress=False)
    values.update(score)
    return ScoreConfig(TeacherSection(path=str(teacher), dataset=str(data), k=K, dtype="float32"),
                       ScoreSection(**values))


def run_score(teacher: Path, data: Path, **score) -> dict:
    cfg = make_config(teacher, data, **score)
    return score_mod.score(cfg, config.config_hash(cfg))


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sidecar_files(data: Path) -> dict[str, bytes]:
    files = {}
    for split in ("train", "valid"):
        for p in sorted(sidecar_dir(data, split).iterdir()):
            files[f"{split}/{p.name}"] = p.read_bytes()
    return files


def write_toml(path: Path, teacher: Path, data: Path) -> Path:
    path.write_text(
        f'[teacher]\npath = "{teacher}"\ndataset = "{data}"\nk = {K}\ndtype = "float32"\n\n'
        f'[score]\ndevice = "cpu"\nbatch_tokens = 1024\nhead_chunk = 256\nshard_samples = {SHARD}\n'
        f'progress = false\n'
    )
    return path


@pytest.fixture(scope="module")
def scored(dataset, teacher_dir, tmp_path_factory):
    data = copy_dataset(dataset, tmp_path_factory.mktemp("scored") / "ds")
    section = run_score(teacher_dir, data)
    assert section["k"] == K
    return data


def documents(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each document of a packed sample, found independently of vpmoe.teacher."""
    bounds, start = [], 0
    for j, t in enumerate(tokens.tolist()):
        if t == tk.EOD:
            bounds.append((start, j))
            start = j + 1
    bounds.append((start, len(tokens)))
    return bounds


def test_sidecar_equals_direct_forward_log_softmax_topk(scored, teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    section = json.loads((scored / "manifest.json").read_text())["teacher"]
    for split in ("train", "valid"):
        sidecar, reader = TeacherSidecar(scored, split), SplitReader(scored, split)
        exact_rows = 0
        sums = {}  # span name -> [positions, sum of entropies, sum of top-K masses], float64 from the reference
        for i in range(len(reader)):
            tokens, spans = reader.sample(i)
            refs, targets = [], []
            for start, end in documents(tokens):
                supervised = [j for j in range(start, end) if spans[j] > 0]
                if not supervised:
                    continue
                with torch.no_grad():
                    logits = model(torch.tensor(tokens[start:end], dtype=torch.long)[None]).logits[0]
                rows = torch.tensor([j - 1 - start for j in supervised])
                refs.append(torch.log_softmax(logits[rows].double(), dim=-1))
                targets += [int(tokens[j]) for j in supervised]
                for j, ref_row in zip(supervised, refs[-1]):
                    total = sums.setdefault(SPAN_NAMES[int(spans[j])], [0, 0.0, 0.0])
                    total[0] += 1
                    total[1] += float(-(ref_row.exp() * ref_row).sum())
                    total[2] += float(ref_row.topk(K).values.exp().sum())
            entry = sidecar.sample(i)
            if not refs:
                assert len(entry.target_logprob) == 0
                continue
            ref = torch.cat(refs)
            ids = torch.from_numpy(entry.topk_ids.astype(np.int64))
            stored = torch.from_numpy(entry.topk_logprobs.astype(np.float64))
            assert ids.shape == (len(ref), K)
            # the stored log-probs are the reference's at the stored ids (float16 rounding)
            at_ids = ref.gather(1, ids)
            torch.testing.assert_close(stored, at_ids, rtol=2**-10, atol=1e-5)
            # the stored ids are the reference top-K (exactly, where no two of the top K + 1 are within 2e-5)
            ref_values, ref_ids = ref.topk(K + 1, dim=-1)
            assert (at_ids >= ref_values[:, K - 1 : K] - 1e-4).all()
            assert (at_ids[:, 1:] <= at_ids[:, :-1] + 1e-4).all()
            clear = (ref_values[:, :-1] - ref_values[:, 1:]).min(dim=1).values > 2e-5
            assert torch.equal(ids[clear], ref_ids[clear, :K])
            exact_rows += int(clear.sum())
            # the actual next token's log-prob
            target_ref = ref.gather(1, torch.tensor(targets)[:, None])[:, 0]
            torch.testing.assert_close(torch.from_numpy(entry.target_logprob.astype(np.float64)), target_ref,
                                       rtol=2**-10, atol=1e-5)
        assert exact_rows > 0.9 * len(sidecar.target_logprob.data)
        # the manifest's means: entropy over the full vocabulary and top-K probability mass, per span and in all
        info = section["splits"][split]
        assert {name: e["positions"] for name, e in info["spans"].items()} == {n: e[0] for n, e in sums.items()}
        # float32 sums over the 201,088-entry vocabulary against float64 ones: the order of a vectorized sum
        # depends on the buffers' alignment (1.5e-5 relative seen); the old fp32 dot product was off by 1.4e-4
        entropy_rel, mass_rel = 5e-5, 1e-4
        for name, (positions, entropy, mass) in sums.items():
            assert info["spans"][name]["mean_entropy"] == pytest.approx(entropy / positions, rel=entropy_rel)
            assert info["spans"][name]["mean_topk_mass"] == pytest.approx(mass / positions, rel=mass_rel)
        positions = sum(e[0] for e in sums.values())
        assert info["mean_entropy"] == pytest.approx(sum(e[1] for e in sums.values()) / positions, rel=entropy_rel)
        assert info["mean_topk_mass"] == pytest.approx(sum(e[2] for e in sums.values()) / positions, rel=mass_rel)


def test_sidecar_aligns_with_supervised_positions(scored, teacher_dir):
    manifest = json.loads((scored / "manifest.json").read_text())
    section = manifest["teacher"]
    assert section["k"] == K and section["reasoning_effort"] == "medium"
    files = {f["name"]: f["sha256"] for f in section["teacher"]["files"]}
    assert files["model.safetensors"] == file_sha256(teacher_dir / "model.safetensors")
    assert section["provenance"]["kind"] == "teacher_sidecar"
    assert section["provenance"]["parents"] == [manifest["provenance"]]
    for split in ("train", "valid"):
        reader = SplitReader(scored, split)
        sidecar = TeacherSidecar(scored, split, deep=True)
        counts = np.array([(reader.sample(i)[1] > 0).sum() for i in range(len(reader))])
        assert counts.sum() > 0
        assert len(sidecar) == len(reader)
        assert np.array_equal(sidecar.target_logprob.lengths, counts)
        assert np.array_equal(sidecar.topk_ids.lengths, counts * K)
        assert np.array_equal(sidecar.topk_logprobs.lengths, counts * K)
        assert sidecar.topk_ids.dtype == np.int32 and sidecar.topk_logprobs.dtype == np.uint16
        info = section["splits"][split]
        assert info["supervised"] == counts.sum() == manifest["splits"][split]["span_tokens"]["reasoning"] + \
            manifest["splits"][split]["span_tokens"]["final"]
        assert info["coverage"] == 1.0
        assert info["bytes_per_position"] == pytest.approx(K * 6 + 2, rel=0.05)
        masses = {}  # span name -> the top-K mass of each position, float64 from the stored float16 log-probs
        for i in range(len(reader)):
            tokens, spans = reader.sample(i)
            entry = sidecar.sample(i)
            assert np.array_equal(entry.positions + 1, np.flatnonzero(spans > 0))
            lp = entry.topk_logprobs.astype(np.float32)
            assert (lp <= 0).all() and (np.diff(lp, axis=1) <= 0).all()
            assert ((entry.topk_ids >= 0) & (entry.topk_ids < tk.VOCAB_SIZE)).all()
            for code, mass in zip(spans[entry.positions + 1], np.exp(lp.astype(np.float64)).sum(axis=1)):
                masses.setdefault(SPAN_NAMES[int(code)], []).append(mass)
        means = info["spans"]
        assert set(means) == set(masses) == {"reasoning", "final"}
        # float16 log-probs near -12 are rounded by up to 2^-8, their exp by up to 0.4%
        for name, e in means.items():
            assert e["positions"] == len(masses[name])
            assert e["mean_topk_mass"] == pytest.approx(np.mean(masses[name]), rel=2**-8)
        # (mean_entropy needs the full vocabulary: checked against the reference forward above)


def test_sidecar_check_refuses_a_changed_dataset(scored, tmp_path):
    data = copy_dataset(scored, tmp_path / "ds")
    spans = data / "train" / "spans.bin"
    raw = bytearray(spans.read_bytes())
    j = raw.index(0, 1)  # some unsupervised token that is not the first
    raw[j] = 1
    spans.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match the dataset"):
        TeacherSidecar(data, "train")
    TeacherSidecar(data, "valid")  # the other split still matches
    raw[j] = 0
    spans.write_bytes(bytes(raw))
    tokens = data / "train" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-1] + b"\x07")
    TeacherSidecar(data, "train")  # counts still match: only the deep check sees the token change
    with pytest.raises(UserError, match="changed since it was scored"):
        TeacherSidecar(data, "train", deep=True)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["provenance"]["created"] = "2000-01-01T00:00:00+00:00"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another build"):
        TeacherSidecar(data, "valid")


def test_killed_and_resumed_run_is_byte_identical(scored, dataset, teacher_dir, tmp_path, monkeypatch):
    data = copy_dataset(dataset, tmp_path / "ds")
    real_write = score_mod.write_shard
    written = []

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        written.append(args[1])
        if len(written) == 2:
            raise KeyboardInterrupt  # the process is stopped between shards

    monkeypatch.setattr(score_mod, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_score(teacher_dir, data)
    partial = data / score_mod.PARTIAL
    done = sorted(p.parent.name + "/" + p.name for p in partial.glob("shards/*/*") if (p / "stats.json").exists())
    assert len(done) == 2
    assert not sidecar_dir(data, "train").exists() and "teacher" not in json.loads((data / "manifest.json").read_text())
    monkeypatch.setattr(score_mod, "write_shard", real_write)

    with pytest.raises(UserError, match="cannot resume.*config changed"):
        run_score(teacher_dir, data, batch_tokens=512)
    resumed = []
    monkeypatch.setattr(score_mod, "write_shard", lambda *a, **k: (resumed.append(a[1]), real_write(*a, **k)))
    run_score(teacher_dir, data)
    assert not set(resumed) & set(written)  # finished shards were not scored again
    assert not partial.exists()
    assert sidecar_files(data) == sidecar_files(scored)


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vpmoe.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkilled_process_resumes_byte_identical(scored, dataset, teacher_dir, tmp_path):
    data = copy_dataset(dataset, tmp_path / "ds")
    cfg = write_toml(tmp_path / "score.toml", teacher_dir, data)
    # SIGKILLed right after its first shard is written, whatever the machine's speed
    killed = subprocess.run([sys.executable, "-m", "vpmoe.testing.killed_cli", "vpmoe.teacher.score:write_shard",
                             "1", "teacher", "score", str(cfg)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    shards = data / score_mod.PARTIAL / "shards"
    assert len(list(shards.glob("*/*/stats.json"))) == 1 < len(score_mod._shards(data, ["train", "valid"], SHARD))
    assert not sidecar_dir(data, "train").exists()
    out = _cli(["teacher", "score", str(cfg)]).communicate()[0]
    assert "resuming" in out and "wrote" in out, out
    assert sidecar_files(data) == sidecar_files(scored)


def test_two_torchrun_ranks_write_the_same_sidecar(scored, dataset, teacher_dir, tmp_path):
    data = copy_dataset(dataset, tmp_path / "ds")
    cfg = write_toml(tmp_path / "score.toml", teacher_dir, data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vpmoe.cli", "teacher", "score", str(cfg)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 1/2" in result.stdout and "rank 0/2" in result.stdout
    assert sidecar_files(data) == sidecar_files(scored)


def test_rescoring_needs_overwrite_and_replaces_every_split(scored, teacher_dir, tmp_path):
    data = copy_dataset(scored, tmp_path / "ds")
    with pytest.raises(UserError, match="already has a teacher sidecar"):
        run_score(teacher_dir, data)
    cfg = make_config(teacher_dir, data, overwrite=True)
    cfg.teacher.splits = ["valid"]
    section = score_mod.score(cfg, config.config_hash(cfg))
    assert list(section["splits"]) == ["valid"]
    assert not sidecar_dir(data, "train").exists()  # the old teacher's train sidecar is gone with its section
    assert sidecar_files_valid(data) == sidecar_files_valid(scored)
    with pytest.raises(UserError, match="covers \\['valid'\\], not 'train'"):
        TeacherSidecar(data, "train")


def sidecar_files_valid(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(sidecar_dir(data, "valid").iterdir())}


def test_inspect_shows_the_sidecar(scored):
    out = io.StringIO()
    inspect(str(scored), split="valid", out=out)
    text = out.getvalue()
    assert "teacher sidecar: tiny-gpt-oss (float32), K 64, reasoning effort in the prompts medium" in text
    assert "train: coverage 100.0%" in text and "valid: coverage 100.0%" in text
    assert "reasoning" in text and "mean top-K mass" in text and "mean entropy" in text
