"""`vpmoe data verify DIR`: check a dataset and its teacher sidecars against the manifest, byte for byte.

For datasets copied between machines. Every split is opened as the readers open it (each `.bin` size against its
`.idx`, the counts against the manifest), then every file whose sha256 the manifest records is hashed again: the
dataset's own files (`files`, recorded by `vpmoe data build`) and the sidecars' (`teacher.splits.<split>.files`,
recorded by `vpmoe teacher score`; older manifests record only the sidecars' indexes and the dataset files that
were scored). A file that differs is named, and the command exits with status 2.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from vpmoe import provenance
from vpmoe.data.indexed import IndexedReader
from vpmoe.data.loader import SplitReader, read_manifest
from vpmoe.errors import UserError


def verify(directory: str | Path) -> None:
    root = Path(directory)
    start = time.perf_counter()
    manifest = read_manifest(root)
    for split in manifest["splits"]:
        SplitReader(root, split)
    recorded = recorded_files(manifest)
    for name in recorded:
        if name.endswith(".idx"):
            IndexedReader(root / name.removesuffix(".idx"))  # the sidecars' sizes (the splits' are checked above)
    if not recorded:
        print(f"{root}: sizes and counts match the manifest; it records no file hashes (it was built before vpmoe "
              f"recorded them), so the contents were not checked")
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(recorded))) as pool:
        problems = [p for p in pool.map(lambda item: _check(root, *item), recorded.items()) if p]
    if problems:
        raise UserError(f"{root}: {len(problems)} of {len(recorded)} files differ from the manifest: "
                        f"{'; '.join(problems)}. Copy them again, or build (or score) the dataset again")
    size = sum((root / name).stat().st_size for name in recorded)
    print(f"verified {root}: {len(recorded)} files ({size / 2**20:.1f} MiB) match the sha256 the manifest records, "
          f"in {time.perf_counter() - start:.1f}s")


def _check(root: Path, name: str, want: dict) -> str | None:
    """What is wrong with one recorded file, or None."""
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if want.get("bytes") not in (None, size):
        return f"{name} is {size} bytes, the manifest records {want['bytes']}"
    if provenance.file_sha256(path) != want["sha256"]:
        return f"{name} has another sha256"
    return None


def recorded_files(manifest: dict) -> dict[str, dict]:
    """Every file the manifest records a sha256 for, by its path inside the dataset: {"sha256", "bytes" (if known)}."""
    files = {name: dict(entry) for name, entry in manifest.get("files", {}).items()}
    teacher = manifest.get("teacher") or {}
    for split, section in teacher.get("splits", {}).items():
        for name, entry in section.get("files", {}).items():
            files[f"{split}/teacher/{name}"] = dict(entry)
        for name, digest in section.get("index_sha256", {}).items():
            files.setdefault(f"{split}/teacher/{name}", {"sha256": digest})
        for name, digest in section.get("dataset_files", {}).items():
            files.setdefault(f"{split}/{name}", {"sha256": digest})
    return files
