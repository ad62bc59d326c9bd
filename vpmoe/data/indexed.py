"""Megatron-LM IndexedDataset files (`.bin` + `.idx`), written and read without Megatron.

`.idx` layout (little-endian): magic `MMIDIDX\\0\\0`, version u64 = 1, dtype code u8, sequence count u64,
document count u64, sequence lengths int32[n], sequence byte offsets int64[n], document indices int64[d]
(sequence index where each document starts, with a leading 0 and the total at the end). `.bin` holds the
sequences back to back. Every sequence here is its own document.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


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
            if os.fstat(src.fileno()).st_size != int(np.sum(lengths)) * self.dtype.itemsize:
                raise ValueError(f"{path}: the file size does not match the sequence lengths")
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
        idx = prefix.with_suffix(".idx")
        with open(idx, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{idx}: not a Megatron IndexedDataset index")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != VERSION:
                raise ValueError(f"{idx}: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            (n,) = struct.unpack("<Q", f.read(8))
            (d,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.dtype = CODE_DTYPES[code]
        self.lengths = np.frombuffer(index, dtype=np.int32, count=n, offset=offset)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=offset + 4 * n)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=d, offset=offset + 12 * n)
        bin_path = prefix.with_suffix(".bin")
        self.data = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_path.stat().st_size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.data[start : start + int(self.lengths[i])]

    @property
    def total(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))
