"""Megatron-LM IndexedDataset files (`.bin` + `.idx`), written and read without Megatron.

`.idx` layout (little-endian): magic `MMIDIDX\\0\\0`, version u64 = 1, dtype code u8, sequence count u64,
document count u64, sequence lengths int32[n], sequence byte offsets int64[n], document indices int64[d]
(sequence index where each document starts, with a leading 0 and the total at the end). `.bin` holds the
sequences back to back. Every sequence here is its own document.

The reader checks a pair of files when it opens them: the index's size against its header, its offsets against
its lengths, and the `.bin` size against the bytes the index describes. A damaged or truncated file is a UserError
naming it, never a short or shifted sample later.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

from vpmoe.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


class IndexedWriter:
    """Appends sequences to `<prefix>.bin`; `close()` writes `<prefix>.idx`."""

    def __init__(self, prefix: str | Path, dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"IndexedDataset has no code for dtype {self.dtype}")
        self._bin = open(self.prefix.with_suffix(".bin"), "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        self.add_many(values, np.array([len(values)], dtype=np.int64))

    def add_many(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append several sequences stored back to back in `values`, with the given lengths."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if int(np.sum(lengths)) != len(values):
            raise ValueError("sequence lengths do not add up to the number of values")
        self._bin.write(values)  # the array's own buffer: no copy
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def add_file(self, path: str | Path, lengths: np.ndarray) -> None:
        """Append several sequences stored back to back in the raw file `path` (values of this writer's dtype)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        with open(path, "rb") as src:
            size, expected = os.fstat(src.fileno()).st_size, int(np.sum(lengths)) * self.dtype.itemsize
            if size != expected:
                raise UserError(f"{path} is {size} bytes, but its sequence lengths need {expected}: the file is "
                                f"damaged")
            _append(src, self._bin)
        self._lengths.append(lengths)

    def close(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(n + 1, dtype=np.int64)
        with open(self.prefix.with_suffix(".idx"), "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(documents.tobytes())

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._bin.close()


def _append(src, dst) -> None:
    """Append the file `src` to `dst`: inside the kernel (copy_file_range) where it can, else through a buffer."""
    dst.flush()
    start, copied = dst.tell(), 0
    try:
        while n := os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30, copied, start + copied):
            copied += n
    except (AttributeError, OSError):  # no copy_file_range on this system or between these files
        pass
    src.seek(copied)
    dst.seek(start + copied)
    shutil.copyfileobj(src, dst, 1 << 24)


class IndexedReader:
    """Memory-mapped reader: `reader[i]` is sequence i as a numpy array (a view, no copy)."""

    def __init__(self, prefix: str | Path) -> None:
        prefix = Path(prefix)
        idx, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        for path in (idx, bin_path):
            if not path.is_file():
                raise UserError(f"{path} is missing")
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            header = f.read(HEADER)
        if len(header) < HEADER or header[: len(MAGIC)] != MAGIC:
            raise UserError(f"{idx} is not a Megatron IndexedDataset index (damaged or another file)")
        version, code, n, d = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise UserError(f"{idx}: unsupported index version {version}")
        if code not in CODE_DTYPES:
            raise UserError(f"{idx}: unknown dtype code {code}: the index is damaged")
        expected = HEADER + 12 * n + 8 * d
        if size != expected:
            raise UserError(f"{idx} is {size} bytes, but its header describes {n} sequences, which take {expected}: "
                            f"the index is truncated or damaged")
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.dtype = CODE_DTYPES[code]
        self.lengths = np.frombuffer(index, dtype=np.int32, count=n, offset=HEADER)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=HEADER + 4 * n)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=d, offset=HEADER + 12 * n)
        want, have = _back_to_back(self.lengths, self.pointers, self.dtype.itemsize), bin_path.stat().st_size
        if want is None:
            raise UserError(f"{idx}: its byte offsets do not follow from its sequence lengths: the index is damaged")
        if have != want:
            raise UserError(
                f"{bin_path} is {have} bytes, but {idx.name} describes {n} sequences of {want // self.dtype.itemsize} "
                f"{self.dtype} values, {want} bytes: the file is {'truncated' if have < want else 'too long'}; restore "
                f"it (`vpmoe data verify DIR` checks a whole dataset), or build (or score) the dataset again"
            )
        self.data = np.memmap(bin_path, mode="r", dtype=self.dtype) if want else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.data[start : start + int(self.lengths[i])]

    @property
    def total(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))


def _back_to_back(lengths: np.ndarray, pointers: np.ndarray, itemsize: int, block: int = 1 << 22) -> int | None:
    """The bytes the sequences take when they lie back to back from offset 0, as the index says; None if not."""
    offset = 0
    for first in range(0, len(lengths), block):
        sizes = lengths[first : first + block].astype(np.int64) * itemsize
        starts = offset + np.cumsum(sizes) - sizes
        if sizes.min() < 0 or not np.array_equal(pointers[first : first + block], starts):
            return None
        offset = int(starts[-1] + sizes[-1])
    return offset
