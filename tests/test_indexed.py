import megatron.core.datasets.indexed_dataset as megatron
import numpy as np
import pytest

from vpmoe.data.indexed import IndexedReader, IndexedWriter
from vpmoe.errors import UserError


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.uint16])
def test_megatron_reads_our_files(tmp_path, dtype):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 200, size=rng.integers(0, 50)).astype(dtype) for _ in range(30)]
    with IndexedWriter(tmp_path / "x", dtype) as w:
        w.add(sequences[0])
        lengths = np.array([len(s) for s in sequences[1:]])
        w.add_many(np.concatenate(sequences[1:]), lengths)
    theirs = megatron.IndexedDataset(str(tmp_path / "x"), mmap=True)
    ours = IndexedReader(tmp_path / "x")
    assert len(theirs) == len(ours) == len(sequences)
    assert np.array_equal(theirs.document_indices, np.arange(len(sequences) + 1))
    for i, expected in enumerate(sequences):
        assert theirs[i].dtype == np.dtype(dtype)
        assert np.array_equal(theirs[i], expected)
        assert np.array_equal(ours[i], expected)
    assert ours.total == sum(len(s) for s in sequences)


def test_lengths_must_add_up(tmp_path):
    w = IndexedWriter(tmp_path / "y", np.int32)
    with pytest.raises(ValueError):
        w.add_many(np.arange(5), np.array([2, 2]))


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_add_file_appends_the_same_bytes_as_add_many(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:
        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr("os.copy_file_range", refuse, raising=False)
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (7, 300_000, 9, 0)]
    lengths = [np.array([len(p)]) for p in parts]
    with IndexedWriter(tmp_path / "a", np.int32) as w:
        for p, n in zip(parts, lengths):
            w.add_many(p, n)
    with IndexedWriter(tmp_path / "b", np.int32) as w:
        for i, (p, n) in enumerate(zip(parts, lengths)):
            if i % 2:
                p.tofile(tmp_path / f"part{i}")
                w.add_file(tmp_path / f"part{i}", n)
            else:
                w.add_many(p, n)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    with pytest.raises(UserError, match="part1 is 1200000 bytes, but its sequence lengths need 12"):
        IndexedWriter(tmp_path / "c", np.int32).add_file(tmp_path / "part1", np.array([3]))
