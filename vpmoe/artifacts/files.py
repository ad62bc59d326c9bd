"""Files and directories written so that a reader never sees half of them.

- `write_text` / `write_json`: a temporary file beside the target, then an atomic rename.
- `read_json`: a JSON file or a UserError naming it (missing, unreadable, corrupt).
- `staged_dir`: a directory built under a temporary name beside its final path and renamed into place when the
  block succeeds; on failure the temporary directory (which only this process wrote) is removed. An existing final
  directory is replaced only when the caller says it may be, and then by renaming it aside first, so that the final
  name never holds half a directory (a crash between the two renames leaves the old one aside as .NAME.old<pid>).
- `remove_dir`: a directory renamed aside, then deleted: its name is free at once, and a crash never leaves a
  half-deleted directory under its name (a checkpoint without its data but with its completion mark).
- `file_sha256`: the sha256 of a file, read in large blocks.
- `write_failed`: the one-line error of a job whose writing failed (a full disk, a file system gone read-only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vpmoe.errors import RunError, UserError


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


def hash_file(path: str | Path, digest, chunk: int = 1 << 22):
    """Feed every byte of the file to `digest` (a hashlib object) and return it."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


def read_json(path: str | Path, what: str = "") -> Any:
    """The parsed JSON file, or a UserError that names it and says what is wrong."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    if not path.is_file():
        raise UserError(f"{label} is missing" if not path.exists() else f"{label} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{label} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{label} is not valid JSON ({e}); it is damaged: restore or rebuild it") from None


@contextlib.contextmanager
def staged_dir(final: str | Path, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; when the block succeeds, it becomes `final`.

    If `final` exists it is replaced only when `may_replace(final)` is true; otherwise a UserError is raised
    before anything is written."""
    final = Path(final)
    if final.exists() and (may_replace is None or not may_replace(final)):
        raise UserError(f"{final} already exists")
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():  # our own pid's leftover: a previous attempt of this process
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: Path, final: Path) -> None:
    """Move directory `source` to `final`; an existing `final` is renamed aside first and removed afterwards."""
    aside = _aside(final) if final.exists() else None
    os.replace(source, final)
    if aside is not None:
        shutil.rmtree(aside)


def remove_dir(directory: Path) -> None:
    """Remove a directory this process wrote, renamed aside first (see the module doc)."""
    shutil.rmtree(_aside(directory))


def _aside(directory: Path) -> Path:
    aside = directory.with_name(f".{directory.name}.old{os.getpid()}")
    os.replace(directory, aside)
    return aside


def write_failed(e: OSError, job: str, where: Path, then: str = "run the same command to resume") -> RunError:
    """The error for `job` ("the build") writing in `where` when the system refused: what, where, and what to do
    (`then`: how to go on once it is fixed)."""
    what = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunError(f"no space left for {job} in {where}{what}: free some space on that device and {then}")
    return RunError(f"{job} in {where} could not go on: {e.strerror or e}{what}; fix that and {then}")
