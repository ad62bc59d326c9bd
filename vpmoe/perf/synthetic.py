"""Random batches shaped like the loader's, so that performance tools need no dataset.

Each row packs `docs_per_row` documents of random lengths; every label is supervised (the first half of each
document as reasoning, the rest as final), so the head runs at every position, as the FLOP formula assumes.
"""

from __future__ import annotations

import torch

from vpmoe.data.loader import Batch
from vpmoe.model.transformer import positions_from_doc_ids


class SyntheticBatches:
    epoch = 0

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, seed: int = 0, docs_per_row: int = 3):
        if docs_per_row < 1 or seq_len < docs_per_row:
            raise ValueError("need 1 <= docs_per_row <= seq_len")
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.docs_per_row = docs_per_row
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows, seq, g = self.micro_batch_size, self.seq_len, self.generator
        ids = torch.randint(0, self.vocab_size, (rows, seq + 1), generator=g)
        doc_ids = torch.zeros(rows, seq, dtype=torch.long)
        spans = torch.full((rows, seq), 2, dtype=torch.long)
        for row in range(rows):
            cuts = torch.randperm(seq - 1, generator=g)[: self.docs_per_row - 1].add(1).sort().values.tolist()
            bounds = [0, *cuts, seq]
            for doc, (start, end) in enumerate(zip(bounds, bounds[1:])):
                doc_ids[row, start:end] = doc
                spans[row, start:(start + end) // 2] = 1
        sample_index = torch.arange(self.drawn, self.drawn + rows)
        self.drawn += rows
        return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), spans, positions_from_doc_ids(doc_ids),
                     doc_ids, sample_index)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}
