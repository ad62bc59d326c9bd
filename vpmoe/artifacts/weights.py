"""Model weights as safetensors: one `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with a
`model.safetensors.index.json` (the Hugging Face layout). Writing streams tensor by tensor, so a model larger than
memory can be written while it is produced; loading checks every name and shape before copying anything. Files are
written with the process's usual permissions (safetensors' temporary files are 0600) and a system error while
writing (a full disk) is an OSError naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vpmoe.artifacts.files import read_json
from vpmoe.errors import UserError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30


def has_weights(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).is_file() or (directory / INDEX_FILE).is_file()


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """tensor name -> the file that holds it, for a single-file or sharded checkpoint."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map")
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise UserError(f"{directory}: shard {missing[0]} named by {INDEX_FILE} is missing")
        return files
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise UserError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UserError(f"{path}: not a readable safetensors file ({e}); it is damaged: restore or re-export it") from None


def shapes(directory: str | Path) -> dict[str, list[int]]:
    out = {}
    for file, names in _by_file(tensor_files(directory)).items():
        with _open(file) as f:
            for name in names:
                out[name] = list(f.get_slice(name).get_shape())
    return out


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name, file in files.items():
        grouped.setdefault(file, []).append(name)
    return grouped


def iter_tensors(directory: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint, one file at a time (all of them, or those in `names`)."""
    files = tensor_files(directory)
    wanted = files if names is None else {n: files[n] for n in names}
    for file, group in _by_file(wanted).items():
        with _open(file) as f:
            for name in group:
                yield name, f.get_tensor(name)


@torch.no_grad()
def load_state(targets: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Copy the checkpoint's tensors into `targets` (a state dict; dtype and device are converted). Every name and
    shape is checked before anything is copied: a checkpoint never half-loads into a model of another shape."""
    files = tensor_files(directory)
    missing = [name for name in targets if name not in files]
    if missing:
        raise UserError(f"{directory}: tensor {missing[0]!r} of the model is missing from the checkpoint "
                        f"({len(missing)} such tensors)")
    extra = sorted(set(files) - set(targets))
    if extra:
        raise UserError(f"{directory}: tensor {extra[0]!r} of the checkpoint does not exist in the model "
                        f"({len(extra)} such tensors)")
    stored = shapes(directory)
    for name, target in targets.items():
        if stored[name] != list(target.shape):
            raise UserError(f"{files[name]}: tensor {name!r} has shape {stored[name]} in the checkpoint but "
                            f"{list(target.shape)} in the model")
    for name, tensor in iter_tensors(directory, targets):
        targets[name].copy_(tensor)


class ShardedWriter:
    """Write tensors as they come into shards of at most `shard_bytes` (a larger tensor gets a shard of its own).
    One shard is written as `model.safetensors`; several as numbered shards plus the index."""

    def __init__(self, directory: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written) + 1:05d}.safetensors"
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        os.chmod(path, 0o666 & ~_umask())
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Finish the files; returns the number of shards."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.directory / WEIGHTS_FILE)
            return 1
        weight_map = {}
        for i, (path, names) in enumerate(self.written, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return n


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_state(directory: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
               shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Write (name, tensor) pairs as (sharded) safetensors into `directory`; returns the number of shards."""
    writer = ShardedWriter(directory, shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return writer.close()
