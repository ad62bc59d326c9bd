import numpy as np
import torch

from vpmoe import tokenizer as tk
from vpmoe.data.loader import Loader, SplitReader, make_rows


def test_rows_align_labels_spans_positions_and_documents():
    a = np.array([5, 6, 7], dtype=np.int32)
    b = np.array([8, 9], dtype=np.int32)
    tokens = np.concatenate([a, [tk.EOD], b])
    spans = np.array([0, 1, 2, 0, 0, 2], dtype=np.uint8)
    rows = make_rows([(tokens, spans)], seq_len=8)
    assert rows["input_ids"][0].tolist() == [5, 6, 7, tk.EOD, 8, 9, tk.EOD, tk.EOD]
    assert rows["labels"][0].tolist() == [6, 7, tk.EOD, 8, 9, tk.EOD, tk.EOD, tk.EOD]
    assert rows["label_spans"][0].tolist() == [1, 2, 0, 0, 2, 0, 0, 0]
    assert rows["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert rows["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


def test_loader_batches_match_the_dataset(synth_dataset):
    loader = Loader(synth_dataset, "train", seq_len=512, micro_batch_size=3, seed=1)
    reader = SplitReader(synth_dataset, "train")
    batch = next(loader)
    for row, index in enumerate(batch.sample_index.tolist()):
        tokens, spans = reader.sample(index)
        n = len(tokens)
        assert batch.input_ids[row, :n].tolist() == tokens.tolist()
        supervised = batch.label_spans[row] > 0
        assert torch.equal(batch.labels[row][supervised], torch.from_numpy(tokens[1:][spans[1:] > 0]).long())
        # every position restarts at 0 right after an EOD
        eod = (batch.input_ids[row, : n - 1] == tk.EOD).nonzero().flatten()
        assert torch.all(batch.position_ids[row, eod + 1] == 0)


def test_order_is_deterministic_and_covers_each_epoch(synth_dataset):
    n = len(SplitReader(synth_dataset, "train"))
    first = Loader(synth_dataset, "train", 512, micro_batch_size=1, seed=3)
    again = Loader(synth_dataset, "train", 512, micro_batch_size=1, seed=3)
    other = Loader(synth_dataset, "train", 512, micro_batch_size=1, seed=4)
    epoch = [next(first).sample_index.item() for _ in range(n)]
    assert sorted(epoch) == list(range(n))
    assert epoch == [next(again).sample_index.item() for _ in range(n)]
    assert epoch != [next(other).sample_index.item() for _ in range(n)]


def test_two_ranks_split_the_same_global_stream(synth_dataset):
    single = Loader(synth_dataset, "train", 512, micro_batch_size=4, seed=0)
    ranks = [Loader(synth_dataset, "train", 512, micro_batch_size=2, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        whole = next(single).sample_index.tolist()
        assert next(ranks[0]).sample_index.tolist() + next(ranks[1]).sample_index.tolist() == whole


def test_state_restores_the_exact_next_batches(synth_dataset):
    loader = Loader(synth_dataset, "train", 512, micro_batch_size=2, seed=5)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(30)]  # runs past an epoch boundary
    resumed = Loader(synth_dataset, "train", 512, micro_batch_size=2, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.label_spans, want.label_spans)
