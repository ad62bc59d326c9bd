"""The teacher sidecar of a dataset split: layout, alignment with the dataset, and the reader `kd_offline` uses.

`<dataset>/<split>/teacher/` holds three Megatron IndexedDataset files with one sequence per dataset sample:
  topk_ids.{bin,idx}        int32, K ids per supervised position (by decreasing teacher log-prob)
  topk_logprobs.{bin,idx}   float16 stored as uint16 bits, K log-probs per supervised position
  target_logprob.{bin,idx}  float16 stored as uint16 bits, the log-prob of the actual token, one per position
Supervised positions are the tokens j with spans[j] > 0, in token order; the teacher's distribution for token j
is its output at input position j - 1. Sample i therefore has (spans_i > 0).sum() entries (x K for the top-K
files). The dataset manifest's `teacher` section records K, the teacher, per-split counts, the sha256 of the
dataset's provenance record (the cheap match check) and of its tokens/spans files (the deep one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpmoe.data.indexed import IndexedReader
from vpmoe.data.loader import SplitReader, read_manifest
from vpmoe.errors import UserError
from vpmoe.artifacts.files import file_sha256

SCHEMA_VERSION = 1
DIRNAME = "teacher"
FILES = {"topk_ids": np.int32, "topk_logprobs": np.uint16, "target_logprob": np.uint16}


def sidecar_dir(dataset: str | Path, split: str) -> Path:
    return Path(dataset) / split / DIRNAME


def provenance_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON of a dataset manifest's provenance record: names the dataset build."""
    canonical = json.dumps(manifest.get("provenance"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def supervised_positions(spans: np.ndarray) -> np.ndarray:
    """Input positions t (0-based) whose next-token prediction is supervised, in sidecar order: t = j - 1."""
    return np.flatnonzero(np.asarray(spans)[1:] > 0).astype(np.int64)


def supervised_counts(spans: IndexedReader, block: int = 4096) -> np.ndarray:
    """(spans_i > 0).sum() for every sample i of a split, read in blocks of samples."""
    counts = np.zeros(len(spans), dtype=np.int64)
    for first in range(0, len(spans), block):
        lengths = spans.lengths[first : first + block].astype(np.int64)
        start = int(spans.pointers[first]) // spans.dtype.itemsize
        flat = np.asarray(spans.data[start : start + int(lengths.sum())]) > 0
        running = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
        ends = np.cumsum(lengths)
        counts[first : first + len(lengths)] = running[ends] - running[ends - lengths]
    return counts


def _complete(section) -> bool:
    """Whether a manifest's teacher section has what the reader relies on."""
    return (isinstance(section, dict) and isinstance(section.get("k"), int)
            and isinstance(section.get("dataset"), dict) and "provenance_sha256" in section["dataset"]
            and isinstance(section.get("splits"), dict)
            and all(isinstance(s, dict) and {"samples", "supervised"} <= s.keys() for s in section["splits"].values()))


@dataclass
class SampleTeacher:
    """The teacher's view of one sample: entry r belongs to input position `positions[r]` (predicting the next)."""

    positions: np.ndarray  # [n] int64
    topk_ids: np.ndarray  # [n, K] int32
    topk_logprobs: np.ndarray  # [n, K] float16
    target_logprob: np.ndarray  # [n] float16


class TeacherSidecar:
    """Random access to a split's teacher sidecar, checked against the dataset it was scored on.

    `TeacherSidecar(dataset, split)` raises a UserError unless the sidecar matches the dataset: the dataset's
    provenance hash, the sample count, and every sample's supervised count (so every entry is aligned).
    `deep=True` also compares the sha256 of the dataset's tokens and spans files with the recorded ones.
    """

    def __init__(self, dataset: str | Path, split: str, deep: bool = False):
        self.dataset, self.split = Path(dataset), split
        manifest = read_manifest(dataset)
        section = manifest.get("teacher")
        if not section:
            raise UserError(f"{dataset} has no teacher sidecar: score it with `vpmoe teacher score`")
        if not _complete(section):
            raise UserError(f"{self.dataset / 'manifest.json'}: its teacher section is damaged: restore the manifest "
                            f"or score the dataset again")
        if split not in section["splits"]:
            raise UserError(f"{dataset}: the teacher sidecar covers {sorted(section['splits'])}, not {split!r}")
        self.section = section
        self.k = int(section["k"])
        self.recorded = section["splits"][split]
        root = sidecar_dir(dataset, split)
        for name in FILES:
            for suffix in (".idx", ".bin"):
                if not (root / f"{name}{suffix}").is_file():
                    raise UserError(f"{root}: {name}{suffix} is missing: the sidecar is incomplete; score the dataset "
                                    f"again")
        self.topk_ids = IndexedReader(root / "topk_ids")
        self.topk_logprobs = IndexedReader(root / "topk_logprobs")
        self.target_logprob = IndexedReader(root / "target_logprob")
        self.data = SplitReader(dataset, split)
        self.check(manifest, deep)

    def __len__(self) -> int:
        return len(self.target_logprob)

    def check(self, manifest: dict, deep: bool = False) -> None:
        where = sidecar_dir(self.dataset, self.split)
        recorded = self.section["dataset"]["provenance_sha256"]
        if provenance_sha256(manifest) != recorded:
            raise UserError(f"{where} was scored on another build of this dataset (provenance differs); score again")
        for name, dtype in FILES.items():
            reader = getattr(self, name)
            if reader.dtype != np.dtype(dtype):
                raise UserError(f"{where}/{name}: dtype {reader.dtype}, expected {np.dtype(dtype)}")
            if len(reader) != len(self.data):
                raise UserError(f"{where}/{name}: {len(reader)} sequences for {len(self.data)} dataset samples")
        counts = supervised_counts(self.data.spans)
        if not np.array_equal(self.target_logprob.lengths, counts):
            i = int(np.flatnonzero(self.target_logprob.lengths != counts)[0])
            raise UserError(f"{where}: sample {i} has {self.target_logprob.lengths[i]} teacher entries but "
                            f"{counts[i]} supervised positions: the sidecar does not match the dataset")
        for name in ("topk_ids", "topk_logprobs"):
            if not np.array_equal(getattr(self, name).lengths, counts * self.k):
                raise UserError(f"{where}/{name}: lengths are not K = {self.k} times the supervised counts")
        if int(counts.sum()) != self.recorded["supervised"]:
            raise UserError(f"{where}: supervised total differs from the manifest's teacher section")
        if len(self.data) != self.recorded["samples"]:
            raise UserError(f"{where}: {len(self.data)} samples, but the manifest's teacher section records "
                            f"{self.recorded['samples']}")
        if deep:
            for name, digest in self.section["splits"][self.split]["dataset_files"].items():
                if file_sha256(self.dataset / self.split / name) != digest:
                    raise UserError(f"{self.dataset / self.split / name} changed since it was scored; score again")

    def sample(self, i: int, spans: np.ndarray | None = None) -> SampleTeacher:
        """Sample i's entries; `spans` (the sample's span labels) saves a read when the caller has them."""
        spans = self.data.spans[i] if spans is None else spans
        positions = supervised_positions(spans)
        n = int(self.target_logprob.lengths[i])
        if len(positions) != n:
            raise UserError(f"sample {i}: {len(positions)} supervised positions in the spans given, {n} in the sidecar")
        return SampleTeacher(
            positions=positions,
            topk_ids=np.asarray(self.topk_ids[i]).reshape(n, self.k),
            topk_logprobs=np.asarray(self.topk_logprobs[i]).view(np.float16).reshape(n, self.k),
            target_logprob=np.asarray(self.target_logprob[i]).view(np.float16),
        )


@dataclass
class TeacherRows:
    """The sidecar entries of a micro-batch, in the row-major order of its supervised positions (`label_spans > 0`)."""

    topk_ids: torch.Tensor  # [N, K] int32
    topk_logprobs: torch.Tensor  # [N, K] float32
    target_logprob: torch.Tensor  # [N] float32

    def to(self, device) -> "TeacherRows":
        return TeacherRows(self.topk_ids.to(device), self.topk_logprobs.to(device), self.target_logprob.to(device))


def batch_rows(sidecar: TeacherSidecar, sample_index, device) -> TeacherRows:
    """The sidecar entries of a batch of samples (by sample number) as tensors on `device`."""
    parts = [sidecar.sample(int(i)) for i in sample_index]

    def stack(name, dtype):
        return torch.from_numpy(np.concatenate([getattr(p, name) for p in parts]).astype(dtype)).to(device)

    return TeacherRows(stack("topk_ids", np.int32), stack("topk_logprobs", np.float32),
                       stack("target_logprob", np.float32))
