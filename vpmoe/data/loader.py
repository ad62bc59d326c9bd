"""Training batches from a built dataset.

Samples are read from the split's IndexedDataset files and padded to `seq_len`. The sample order is a
stream: epoch e visits the samples in `permutation(seed, e)`; each micro-batch takes the next
`micro_batch_size * world_size` samples of the stream and rank r keeps its slice. The loader state is the
stream position, so a resumed run (with any world size) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpmoe import tokenizer as tk
from vpmoe.data.indexed import IndexedReader
from vpmoe.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64: the next token (EOD where there is none)
    label_spans: torch.Tensor  # [B, S] int64: span of labels[t]; 0 means "no loss here"
    position_ids: torch.Tensor  # [B, S] int64: restart at 0 in every document
    doc_ids: torch.Tensor  # [B, S] int64: document index within the row; padding is a document of its own
    sample_index: torch.Tensor  # [B] int64: sample number within the split

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))


MANIFEST_KEYS = ("format", "seq_len", "pack", "reasoning_effort", "records", "rejects", "truncated", "splits")


def read_manifest(dataset: str | Path) -> dict:
    """A dataset's manifest, or a UserError saying why the directory is not a usable dataset."""
    root = Path(dataset)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"dataset {root} {what} (a dataset is the directory `vpmoe data build` writes)")
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{dataset} is not a built dataset (no manifest.json); build it with `vpmoe data build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): restore it or build the dataset again") from None
    if not isinstance(manifest, dict):
        manifest = {}
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    splits = manifest.get("splits")
    if not missing and not (isinstance(splits, dict) and all(
            isinstance(s, dict) and {"samples", "tokens"} <= s.keys() for s in splits.values())):
        missing = ["the splits' counts"]
    if missing:
        raise UserError(f"{path} is not a dataset manifest (it lacks {', '.join(missing)}): restore it or build the "
                        f"dataset again")
    return manifest


class SplitReader:
    """Random access to one split: tokens and spans of sample i. Opening it checks the split's files against each
    other and against the manifest's counts."""

    def __init__(self, dataset: str | Path, split: str):
        root = Path(dataset) / split
        self.manifest = read_manifest(dataset)
        recorded = self.manifest["splits"].get(split)
        if recorded is None or not (root / "tokens.idx").is_file():
            raise UserError(f"{dataset} has no split {split!r}")
        self.tokens = IndexedReader(root / "tokens")
        self.spans = IndexedReader(root / "spans")
        for reader, name, dtype in ((self.tokens, "tokens", np.int32), (self.spans, "spans", np.uint8)):
            if reader.dtype != np.dtype(dtype):
                raise UserError(f"{root / name}.idx: dtype {reader.dtype}, expected {np.dtype(dtype)}")
        if not np.array_equal(self.tokens.lengths, self.spans.lengths):
            raise UserError(f"{root}: tokens and spans have different sample lengths")
        if (len(self.tokens), self.tokens.total) != (recorded["samples"], recorded["tokens"]):
            raise UserError(f"{root}/tokens.idx holds {len(self.tokens)} samples, {self.tokens.total} tokens, but the "
                            f"manifest records {recorded['samples']} samples, {recorded['tokens']} tokens: these are "
                            f"not the files this dataset was built with; restore them or build the dataset again")

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[i], self.spans[i]


def make_rows(samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Pad samples to `seq_len` and derive labels, label spans, positions and document ids."""
    b = len(samples)
    input_ids = np.full((b, seq_len), tk.EOD, dtype=np.int64)
    labels = np.full((b, seq_len), tk.EOD, dtype=np.int64)
    label_spans = np.zeros((b, seq_len), dtype=np.int64)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    doc_ids = np.zeros((b, seq_len), dtype=np.int64)
    for row, (tokens, spans) in enumerate(samples):
        n = len(tokens)
        if n > seq_len:
            raise UserError(f"a sample has {n} tokens, more than seq_len {seq_len}: build the dataset for this length")
        input_ids[row, :n] = tokens
        labels[row, : n - 1] = tokens[1:]
        label_spans[row, : n - 1] = spans[1:]
        # A document starts at 0 and right after every EOD separator; the EOD closes the document before it.
        starts = np.zeros(n, dtype=np.int64)
        starts[1:] = tokens[:-1] == tk.EOD
        doc = np.cumsum(starts)
        first = np.flatnonzero(np.concatenate([[1], starts[1:]]))
        position_ids[row, :n] = np.arange(n) - first[doc]
        doc_ids[row, :n] = doc
        doc_ids[row, n:] = doc[-1] + 1 if n else 0
        position_ids[row, n:] = np.arange(seq_len - n)
    return {
        "input_ids": input_ids, "labels": labels, "label_spans": label_spans,
        "position_ids": position_ids, "doc_ids": doc_ids,
    }


class Loader:
    """Deterministic, shardable, resumable micro-batches from one split of a dataset."""

    def __init__(
        self, dataset: str | Path, split: str, seq_len: int, micro_batch_size: int, seed: int,
        rank: int = 0, world_size: int = 1, shuffle: bool = True,
    ):
        self.reader = SplitReader(dataset, split)
        if len(self.reader) == 0:
            raise UserError(f"{dataset}: split {split!r} is empty")
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.consumed = 0
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _stream(self, position: int) -> int:
        n = len(self.reader)
        epoch = position // n
        if epoch != self._epoch:
            self._epoch = epoch
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
        return int(self._order[position % n])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        start = self.consumed + self.rank * self.micro_batch_size
        indices = [self._stream(start + k) for k in range(self.micro_batch_size)]
        self.consumed += self.micro_batch_size * self.world_size
        rows = make_rows([self.reader.sample(i) for i in indices], self.seq_len)
        tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
        return Batch(**tensors, sample_index=torch.tensor(indices, dtype=torch.int64))

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.reader)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "num_samples": len(self.reader), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_samples", "shuffle"):
            if state[key] != mine[key]:
                raise UserError(f"loader state does not match this dataset/config: {key} {state[key]} != {mine[key]}")
        self.consumed = int(state["consumed"])
