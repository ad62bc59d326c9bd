import numpy as np
import pytest

from vpmoe.data.indexed import IndexedReader, IndexedWriter


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.uint16])
def test_megatron_reads_our_files(tmp_path, dtype):
    megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")
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
