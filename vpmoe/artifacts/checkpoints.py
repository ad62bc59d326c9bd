"""Training checkpoints: one DCP directory per step, written under a temporary name and renamed when complete.

    <run>/checkpoints/step_0000100/   model, the stage's own modules ("extra") and the optimizer (DCP, sharded per
                                      rank, resharded on load to any world size; optimizer state is keyed by
                                      "model.<name>" / "extra.<name>"),
                                      trainer_rank<r>.pt (scheduler, loader, step, objective state, RNG of rank r),
                                      model_config.json, config.toml, provenance.json,
                                      complete.json (written last, before the rename)
Only directories named step_NNNNNNN that hold complete.json are ever resumed from. Saving a step that exists
replaces it by renaming (the old one is moved aside first), so a crash leaves a complete checkpoint of that step.
Pruning (all but the last `keep`) removes a checkpoint's completion marker before its files.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vpmoe.artifacts.files import replace_dir
from vpmoe.distributed import Ranks, barrier

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
    `extra` holds the stage's own modules (saved and resumed, never exported)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if ranks.is_main:
        if tmp.exists():  # a save of this step that died before its rename: ours to remove
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(ranks)
    state = _state(model, optimizer, extra)
    with _single_process_quiet(ranks):
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{ranks.rank}.pt")
    barrier(ranks)
    if ranks.is_main:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": ranks.world_size}) + "\n")
        replace_dir(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            (old / COMPLETE).unlink()  # unmarked first: pruning cut short never leaves a half checkpoint marked
            shutil.rmtree(old)
    barrier(ranks)
    return final


def load(path: Path, model, optimizer, ranks: Ranks, extra: torch.nn.Module | None = None) -> dict:
    """Load model, the stage's modules and optimizer (resharding to this world size); return this rank's trainer
    state."""
    state = _state(model, optimizer, extra)
    with _single_process_quiet(ranks):
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "extra" in state:
        set_model_state_dict(extra, state["extra"], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(_Owner(model, extra), optimizer, state["optim"])
    own = path / f"trainer_rank{ranks.rank}.pt"
    # With a different world size, ranks without their own file take rank 0's (RNG streams then differ).
    trainer_state = torch.load(own if own.exists() else path / "trainer_rank0.pt", weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def load_model_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill a (non-sharded) model state dict from a training checkpoint, in one process."""
    with _single_process_quiet(Ranks()):
        dcp.load({"model": state}, checkpoint_id=str(path))


@contextlib.contextmanager
def _single_process_quiet(ranks: Ranks):
    """DCP warns that it assumes a single process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        if not ranks.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
