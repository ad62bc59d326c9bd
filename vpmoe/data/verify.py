"""`vpmoe data verify DIR`: check a dataset and its teacher sidecars against the manifest, byte for byte.

For datasets copied between machines. Every split is opened as the readers open it (each `.bin` size against its
`.idx`, the counts against the manifest), then every file whose sha256 the manifest records is hashed again: the
dataset's own files (`files`, recorded by `vpmoe data build`) and the sidecars' (`teacher.splits.<split>.files`,
recorded by `vpmoe teacher score`; older manifests record only the sidecars' indexes and the dataset files that
were scored). A file that differs is named, and the command exits with status 2.
"""

from __future__ import annotations

import time
from pathlib import Path

from vpmoe.data.build import file_records
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
    present = file_records(root, [name for name in recorded if (root / name).is_file()])
    problems = [_problem(name, want, present.get(name)) for name, want in recorded.items()]
    problems = [p for p in problems if p]
    if problems:
        raise UserError(f"{root}: {len(problems)} of {len(recorded)} files differ from the manifest: "
                        f"{'; '.join(problems)}. Copy them again, or build (or score) the dataset again")
    size = sum(entry["bytes"] for entry in present.values())
    print(f"verified {root}: {len(recorded)} files ({size / 2**20:.1f} MiB) match the sha256 the manifest records, "
          f"in {time.perf_counter() - start:.1f}s")


def _problem(name: str, want: dict, have: dict | None) -> str | None:
    if have is None:
        return f"{name} is missing"
    if want.get("bytes") not in (None, have["bytes"]):
        return f"{name} is {have['bytes']} bytes, the manifest records {want['bytes']}"
    if have["sha256"] != want["sha256"]:
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
