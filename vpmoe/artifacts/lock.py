"""One writer per directory: an exclusive lock held for the life of a process (a run, a build, an export).

`with lock_dir(path, what="the training run"):` creates `path` if needed and takes an exclusive `flock` on
`path/.vpmoe.lock`, where it records the holder (what, pid, host, since). Another process asking for the same
directory gets a UserError naming the holder. The kernel drops a lock when its process ends, however it ends, so a
lock file left by a killed process is stale: the next process takes it over and says so. On exit the lock file is
removed, and `path` too when this call created it and nothing else was written there.

Rename a locked directory's contents, never the directory itself (its lock file would go along): a staging
directory publishes a subdirectory (`<out>.partial/dataset` -> `<out>`) and is then removed, renamed aside first
so that its name is free at once. The release removes only its own lock file, found by identity, never one that
another process has created at `path` since.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from vpmoe.errors import RunError, UserError

LOCK_FILE = ".vpmoe.lock"


@contextlib.contextmanager
def lock_dir(path: str | Path, what: str) -> Iterator[Path]:
    """Hold `path` (created if missing) for this process; `what` names the job in messages ("the data build")."""
    path = Path(path)
    fd, created = _acquire(path, what)
    try:
        yield path
    finally:
        try:
            if _is_ours(fd, path / LOCK_FILE):
                os.unlink(path / LOCK_FILE)
        finally:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty: anything written there stays


def _acquire(path: Path, what: str) -> tuple[int, bool]:
    created = _make_dir(path, what)
    try:
        return _lock(path, what), created
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _lock(path: Path, what: str) -> int:
    file = path / LOCK_FILE
    while True:
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            raise UserError(f"{path} was moved or removed just now (the process that held it finished?): run the "
                            f"command again") from None
        except OSError as e:
            raise UserError(f"cannot write the lock file {file} ({e.strerror}): {what} needs a directory it can "
                            f"write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise UserError(f"{path} is in use by {_describe(holder)}: wait for it to finish or stop it (two "
                                f"processes would write over each other's files)") from None
            raise RunError(f"cannot lock {file}: {e.strerror} (this file system may not support file locks)") from None
        if _is_ours(fd, file):
            break
        os.close(fd)  # we locked a file its holder had just removed: start again
    previous = _read(fd)
    if previous is not None:
        print(f"note: taking over the lock on {path}: {_describe(previous)} left it and {_gone(previous)}",
              file=sys.stderr)
    record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _make_dir(path: Path, what: str) -> bool:
    """Create `path` if it is missing; True when this call created it."""
    if path.is_dir():
        return False
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if path.is_dir():
            return False  # another process created it first
        raise UserError(f"{path} is a file, not a directory: {what} needs a directory there") from None
    except NotADirectoryError:
        raise UserError(f"cannot create {path}: a part of that path is a file, not a directory") from None
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror}): {what} needs to write there") from None
    return True


def _is_ours(fd: int, file: Path) -> bool:
    """Whether `file` is still the very file `fd` has open (not removed, not replaced by another holder's)."""
    try:
        here, mine = os.stat(file), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> dict | None:
    """The holder record in a lock file; None when it is empty (nobody held it, or the holder is starting)."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (starting up)"
    if not holder:
        return "another process (its lock file is unreadable)"
    return (f"{holder.get('what', 'another process')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


def _gone(holder: dict) -> str:
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "is no longer running"
        except PermissionError:
            pass
    return "no longer holds it"
