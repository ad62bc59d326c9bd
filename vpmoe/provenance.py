"""Provenance records: what made an artifact, so it can be made again.

No machine paths or host names: input files are named relative to the working directory (or by file name
when they live elsewhere) and identified by their sha256.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import vpmoe
from vpmoe import tokenizer

TOOLS = ("torch", "numpy", "openai-harmony", "tiktoken", "transformers", "safetensors")


def git_sha() -> str:
    """The project's commit, with `-dirty` when the checkout has uncommitted changes; 'unknown' outside git."""
    root = Path(vpmoe.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "vpmoe": vpmoe.__version__}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def portable_name(path: str | Path) -> str:
    """A path fit for a committed record: relative to the working directory when inside it, else the file name."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def record(kind: str, config_hash: str, parents: list[dict] | None = None, **extra) -> dict:
    """A provenance record for one artifact."""
    return {
        "kind": kind,
        "git_sha": git_sha(),
        "config_hash": config_hash,
        "tokenizer_sha256": tokenizer.tokenizer_hash(),
        "tools": tool_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parents": parents or [],
        **extra,
    }
