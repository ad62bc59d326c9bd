"""Training checkpoints: one DCP directory per step, written under a temporary name and renamed when complete.

    <run>/checkpoints/step_0000100/   model, the stage's own modules ("extra") and the optimizer (DCP, sharded per
                                      rank, resharded on load to any world size; optimizer state is keyed by
                                      "model.<name>" / "extra.<name>"),
                                      trainer_rank<r>.pt (scheduler, loader, step, objective state, RNG of rank r),
                                      model_config.json, config.toml, provenance.json,
                                      complete.json (written last, before the rename: the size and sha256 of
                                      every other file, hashed by all ranks, each its share)
Only directories named step_NNNNNNN that hold complete.json are ever resumed from. Saving a step that exists
replaces it by renaming (the old one is moved aside first), so a crash leaves a complete checkpoint under that
step's name or none (the old one then lies aside as .step_NNNNNNN.old<pid>, and a resume takes the step before);
old checkpoints are removed the same way, so a crash never leaves one half-deleted.

A checkpoint is verified against its complete.json when it is chosen (`choose` for a run, `verify` for one
checkpoint): a damaged latest checkpoint (a truncated or altered file, a disk error) is skipped with a message
that names it, says why and names the step it falls back to; when none is intact, nothing is chosen silently.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vpmoe.artifacts.files import file_sha256, read_json, remove_dir, replace_dir, write_failed
from vpmoe.distributed import Ranks, barrier
from vpmoe.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{7})$")
COMPLETE = "complete.json"
MODEL_CONFIG = "model_config.json"  # the ModelConfig of the checkpoint's model
ROOT = "checkpoints"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ROOT


def step_of(directory: Path) -> int | None:
    """The step of a training checkpoint directory, None if the name is not step_NNNNNNN."""
    match = STEP_DIR.match(directory.name)
    return int(match.group(1)) if match else None


def is_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return step_of(directory) is not None and (directory / COMPLETE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_checkpoint(p)), key=lambda p: p.name)


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Owner(torch.nn.Module):
    """The model and the stage's own modules under one root: the optimizer state's names come from it."""

    def __init__(self, model: torch.nn.Module, extra: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else torch.nn.ModuleDict()


def _state(model, optimizer, extra) -> dict:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(_Owner(model, extra), optimizer)}
    if extra is not None and any(True for _ in extra.parameters()):
        state["extra"] = get_model_state_dict(extra)
    return state


def save(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, ranks: Ranks, files: dict[str, str],
         keep: int, extra: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). `files` are small text files written by rank 0;
    `extra` holds the stage's own modules (saved and resumed, never exported). A full disk is a RunError (exit 1)
    that says which step the run resumes from; what this save wrote is removed."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    try:
        if ranks.is_main:
            if tmp.exists():  # a save of this step that died before its rename: ours (the run is locked)
                remove_dir(tmp)
            tmp.mkdir(parents=True)
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
        barrier(ranks)
        state = _state(model, optimizer, extra)
        with _single_process_quiet(ranks):
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{ranks.rank}.pt")
        barrier(ranks)
        records = _hash_files(tmp, ranks)
        if ranks.is_main:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": ranks.world_size,
                                                    "files": records}, indent=1) + "\n")
            replace_dir(tmp, final)
            for old in complete_checkpoints(run_dir)[:-keep]:
                remove_dir(old)
    except (OSError, CheckpointException) as e:
        error = _os_error(e)
        if error is None:
            raise
        if ranks.is_main and tmp.exists():
            remove_dir(tmp)
        before = latest(run_dir)
        then = "run the same command to resume" + (f" (from {before.name})" if before else " (from the start)")
        raise write_failed(error, f"the checkpoint of step {step}", root, then) from None
    barrier(ranks)
    return final


def _os_error(e: BaseException) -> OSError | None:
    """The system's error behind a failed save (DCP wraps each rank's exception in a CheckpointException)."""
    if isinstance(e, CheckpointException):
        e = next((exc for exc, _ in e.failures.values() if isinstance(exc, OSError)), None)
    return e if isinstance(e, OSError) and e.errno is not None else None


def _hash_files(directory: Path, ranks: Ranks) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file in `directory` (collective: each rank hashes its share)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != COMPLETE)
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in names[ranks.rank :: ranks.world_size]}
    return {name: record for share in _all_gather(mine, ranks) for name, record in share.items()}


def _all_gather(value, ranks: Ranks) -> list:
    if not ranks.distributed:
        return [value]
    out = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def verify(path: str | Path, ranks: Ranks | None = None) -> str | None:
    """Why checkpoint `path` is damaged (a file missing, of another size or sha256 than complete.json records), or
    None when it is intact. Collective when `ranks` is distributed: each rank hashes its share. A checkpoint written
    before vpmoe recorded its files has nothing to check against and passes."""
    path, ranks = Path(path), ranks or Ranks()
    if ranks.distributed:
        return _verify(path, ranks)
    # One process resolves the same checkpoint several times (its config, then its weights): hash it once.
    stat = (path / COMPLETE).stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = _verify(path, ranks)
    return _VERIFIED[key]


_VERIFIED: dict[tuple, str | None] = {}


def _verify(path: Path, ranks: Ranks) -> str | None:
    try:
        record = read_json(path / COMPLETE, "completion record")
    except UserError:
        return f"its {COMPLETE} is damaged"
    if not isinstance(record, dict):
        return f"its {COMPLETE} is damaged"
    files = record.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= v.keys()
                                              for v in files.values()):
        return f"its {COMPLETE} is damaged"
    problems = []
    for name, want in sorted(files.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["bytes"]:
            problems.append(f"{name} is {file.stat().st_size} bytes, {COMPLETE} records {want['bytes']}")
    if not problems:
        for name in sorted(files)[ranks.rank :: ranks.world_size]:
            if file_sha256(path / name) != files[name]["sha256"]:
                problems.append(f"{name} has another sha256 than {COMPLETE} records")
        problems = sorted(p for share in _all_gather(problems, ranks) for p in share)
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def choose(run_dir: str | Path, ranks: Ranks | None = None) -> Path | None:
    """The latest intact complete checkpoint of a run (None when it has none yet). Damaged ones are skipped with a
    message naming each, why, and the step chosen instead; when every one is damaged, a UserError."""
    ranks = ranks or Ranks()
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path, ranks)
        if problem is None:
            if ranks.is_main:
                for bad, why in damaged:
                    print(f"warning: checkpoint {bad} is damaged ({why}): falling back to {path.name}", file=sys.stderr)
            return path
        damaged.append((path, problem))
    if damaged:
        shown = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
        raise UserError(f"every complete checkpoint of {run_dir} is damaged ({shown}): restore one, or remove "
                        f"{checkpoint_dir(run_dir)} to start the run over")
    return None


def load(path: Path, model, optimizer, ranks: Ranks, extra: torch.nn.Module | None = None) -> dict:
    """Load model, the stage's modules and optimizer (resharding to this world size); return this rank's trainer
    state."""
    state = _state(model, optimizer, extra)
    with _readable(path, CheckpointException), _single_process_quiet(ranks):
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "extra" in state:
        set_model_state_dict(extra, state["extra"], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(_Owner(model, extra), optimizer, state["optim"])
    own = path / f"trainer_rank{ranks.rank}.pt"
    # With a different world size, ranks without their own file take rank 0's (RNG streams then differ).
    with _readable(path, RuntimeError, EOFError, pickle.UnpicklingError):
        trainer_state = torch.load(own if own.exists() else path / "trainer_rank0.pt", weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def load_model_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill a (non-sharded) model state dict from a training checkpoint, in one process."""
    with _readable(path, CheckpointException), _single_process_quiet(Ranks()):
        dcp.load({"model": state}, checkpoint_id=str(path))


@contextlib.contextmanager
def _readable(path: Path, *errors: type[BaseException]):
    """A checkpoint that cannot be read (damaged, and written before its files were recorded) is a UserError."""
    try:
        yield
    except errors as e:
        if isinstance(e, CheckpointException):
            e = next(iter(e.failures.values()))[0]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be read ({first}): it is damaged; restore it or use an earlier "
                        f"one") from None


@contextlib.contextmanager
def _single_process_quiet(ranks: Ranks):
    """DCP warns that it assumes a single process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        if not ranks.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
