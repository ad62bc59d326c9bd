"""Checkpoint writes under failure: a save that dies midway leaves the latest complete checkpoint as it was, a
re-save of a step replaces it only when complete, pruning keeps exactly `checkpoint.keep`, and a checkpoint being
pruned is never left looking complete."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from vpmoe.artifacts import checkpoints
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.distributed import Ranks
from vpmoe.errors import RunError
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import train


class Disk(OSError):
    pass


def die_deleting(monkeypatch, step: str) -> None:
    """shutil.rmtree of a directory whose name holds `step` deletes its shards, then fails like a dying disk."""
    real = shutil.rmtree

    def dying(path, *args, **kwargs):
        path = Path(path)
        if step in path.name:
            for shard in path.glob("*.distcp"):
                shard.unlink()
            raise Disk(5, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying)


def tiny(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save(run: Path, step: int, seed: int = 0, keep: int = 3) -> Path:
    model, optimizer = tiny(seed)
    return checkpoints.save(run, step, model, optimizer, {"step": step, "seed": seed}, Ranks(),
                            {"note.txt": f"seed {seed}\n"}, keep)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under a directory with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def loaded_seed(path: Path) -> int:
    model, optimizer = tiny(99)
    return checkpoints.load(path, model, optimizer, Ranks())["seed"]


def fail_after_shards(monkeypatch):
    """dcp.save writes the shards, then the disk fills: the save dies before its completion marker."""
    real = dcp.save

    def dying(state, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        raise Disk(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", dying)


def test_a_save_dying_midway_leaves_the_latest_checkpoint_unchanged(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run, 1, seed=1, keep=2)
    latest = save(run, 2, seed=2, keep=2)
    before = snapshot(latest)
    fail_after_shards(monkeypatch)
    with pytest.raises(RunError, match="no space left for the checkpoint of step"):
        save(run, 3, seed=3, keep=2)
    assert checkpoints.latest(run) == latest and snapshot(latest) == before and loaded_seed(latest) == 2
    # nothing pruned for a checkpoint that never completed
    assert [p.name for p in checkpoints.complete_checkpoints(run)] == ["step_0000001", "step_0000002"]
    monkeypatch.undo()
    assert loaded_seed(save(run, 3, seed=3, keep=2)) == 3  # the next attempt clears the dead one's leftovers
    assert sorted(p.name for p in checkpoints.checkpoint_dir(run).iterdir()) == ["step_0000002", "step_0000003"]


def test_a_re_save_of_a_step_replaces_it_only_when_complete(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = save(run, 5, seed=1)
    before = snapshot(first)
    fail_after_shards(monkeypatch)
    with pytest.raises(RunError, match="no space left for the checkpoint of step"):
        save(run, 5, seed=2)
    assert checkpoints.latest(run) == first and snapshot(first) == before and loaded_seed(first) == 1
    monkeypatch.undo()
    again = save(run, 5, seed=2)
    assert again == first and loaded_seed(again) == 2 and (again / "note.txt").read_text() == "seed 2\n"
    assert sorted(p.name for p in checkpoints.checkpoint_dir(run).iterdir()) == ["step_0000005"]


def test_a_pruned_checkpoint_is_unmarked_before_its_files_go(tmp_path, monkeypatch):
    """Pruning that dies halfway (the shards deleted, not yet the rest) must not leave a directory that still
    claims to be complete: `vpmoe eval --all-steps` and resume would trust it."""
    run = tmp_path / "run"
    save(run, 1, seed=1, keep=1)
    die_deleting(monkeypatch, "step_0000001")  # pruning renames it aside first, then deletes
    with pytest.raises(RunError, match="could not go on: Input/output error"):
        save(run, 2, seed=2, keep=1)
    assert [p.name for p in checkpoints.complete_checkpoints(run)] == ["step_0000002"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_data")
    src = synthetic.write_jsonl(root / "src.jsonl", synthetic.records(4, seed=2))
    return build(DataSection(inputs=[str(src)], format="synth", out=str(root / "ds"), seq_len=256, pack=False,
                             valid_fraction=0.0))


def test_a_training_run_keeps_exactly_checkpoint_keep(tmp_path, small_dataset):
    run = train(load_train_config("tiny_ce", [
        f"data.path={json.dumps(str(small_dataset))}", f"run.dir={json.dumps(str(tmp_path / 'run'))}",
        "train.steps=3", "checkpoint.every=1", "checkpoint.keep=2", "optim.warmup_steps=1"]))
    assert sorted(p.name for p in checkpoints.checkpoint_dir(run).iterdir()) == ["step_0000002", "step_0000003"]
    assert all(checkpoints.is_checkpoint(p) for p in checkpoints.checkpoint_dir(run).iterdir())


def test_a_re_save_dying_while_the_old_step_is_deleted_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """The old step is renamed aside before the new one takes its name: deleting it may fail half-way without
    leaving a half-deleted checkpoint under the step's name (a delete-then-rename would)."""
    run = tmp_path / "run"
    save(run, 5, seed=1)
    die_deleting(monkeypatch, "step_0000005")  # the old step, under its name or renamed aside
    with pytest.raises(RunError, match="could not go on: Input/output error"):
        save(run, 5, seed=2)
    monkeypatch.undo()
    [kept] = checkpoints.complete_checkpoints(run)
    assert checkpoints.verify(kept) is None and loaded_seed(kept) == 2
