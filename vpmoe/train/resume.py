"""What a resumed run must match: the checkpoint it resumes from records the dataset, the model and the stage.

A run directory is one model trained by one stage on one dataset. Resuming it with another model config or another
`train.stage` is refused (a new stage is a new run directory that starts from these weights: `model.init_from`).
Another dataset (compared by the sha256 of its manifest's file records, so a rebuild of the same bytes is the same
dataset) is refused unless `run.allow_dataset_change = true`; the run's provenance then records both, since every
start of a run appends its record to the run's history (`history` in provenance.json), never overwriting it. Other
settings (learning rates, steps, logging) may change; a resume lists those that did.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

from vpmoe import config as config_io
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.files import read_json, write_text
from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, model_config_to_dict
from vpmoe.teacher.sidecar import provenance_sha256
from vpmoe.train.config import TrainConfig

PROVENANCE = "provenance.json"
# Settings whose change says nothing about what the checkpoint holds (data.path: the dataset is compared by content).
FREE_TO_CHANGE = ("run.dir", "run.allow_dataset_change", "data.path", "train.steps", "train.log_every", "checkpoint.",
                  "logging.")


def dataset_sha256(manifest: dict) -> str:
    """Identifies a dataset by content: its manifest's file records (sha256 of each file); a manifest written before
    they were recorded, by its build's provenance record."""
    if "files" not in manifest:
        return provenance_sha256(manifest)
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check(cfg: TrainConfig, checkpoint: Path, model_cfg: ModelConfig, manifest: dict) -> None:
    """Refuse to resume `checkpoint` with another model, stage or (unless allowed) dataset; note other changes."""
    run = cfg.run.dir
    stored_model = read_json(checkpoint / checkpoints.MODEL_CONFIG, "model config")
    wanted_model = model_config_to_dict(model_cfg)
    if stored_model != wanted_model:
        key = _first_difference(stored_model, wanted_model)
        raise UserError(f"run.dir {run} holds a model that differs from model.config {cfg.model.config} (in {key}; "
                        f"see {checkpoint / checkpoints.MODEL_CONFIG}): use a new run.dir (model.init_from = "
                        f"{json.dumps(str(checkpoint))} starts one from these weights)")
    stored = _stored_config(checkpoint)
    stage = stored.get("train", {}).get("stage", "ce")
    if stage != cfg.train.stage:
        raise UserError(f"run.dir {run} was trained with train.stage = {stage!r}, this config asks for "
                        f"{cfg.train.stage!r}: a new stage needs a new run.dir (model.init_from = "
                        f"{json.dumps(str(checkpoint))} starts it from these weights)")
    record = read_json(checkpoint / PROVENANCE, "provenance")
    recorded, name = _recorded_dataset(record)
    now = dataset_sha256(manifest) if "dataset_sha256" in record else provenance_sha256(manifest)
    if recorded is not None and recorded != now:
        if not cfg.run.allow_dataset_change:
            raise UserError(
                f"run.dir {run} was trained on another dataset ({name}) than data.path {cfg.data.path} (its "
                f"manifest differs): set run.allow_dataset_change = true to go on with this one (provenance.json "
                f"then records both), or use a new run.dir")
        print(f"note: {run} goes on with dataset {cfg.data.path} (it was trained on {name} up to "
              f"{checkpoint.name}): run.allow_dataset_change = true", file=sys.stderr)
    changed = _changed_settings(stored, config_io.to_dict(cfg))
    if changed:
        print(f"note: resuming {run} with changed settings: {'; '.join(changed)}", file=sys.stderr)


def _stored_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}): the checkpoint is damaged; restore it or use an earlier "
                        f"one") from None


def _recorded_dataset(record: dict) -> tuple[str | None, str]:
    """The dataset identity a run's provenance record holds, and its name."""
    parents = record.get("parents") or [{}]
    parent = dict(parents[0]) if isinstance(parents[0], dict) else {}
    name = str(parent.pop("dataset", "unknown"))
    if "dataset_sha256" in record:
        return record["dataset_sha256"], name
    # Written before runs recorded the dataset's content hash: the parent is the manifest's provenance record.
    return (provenance_sha256({"provenance": parent}) if parent else None), name


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return where or "the whole config"


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_settings(stored: dict, current: dict) -> list[str]:
    before, now = _flatten(stored), _flatten(current)
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)
                  and not k.startswith(FREE_TO_CHANGE))
    return [f"{k} {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in keys]


def with_history(record: dict, previous: dict | None) -> dict:
    """`record` (this start of the run) with the records of every earlier start, oldest first."""
    if previous is None:
        return record
    history = list(previous.get("history", []))
    history.append({k: v for k, v in previous.items() if k != "history"})
    return {**record, "history": history}


def previous_record(run_dir: Path, checkpoint: Path | None) -> dict | None:
    """The latest provenance record of a run: the run directory's, else (copied without it) the checkpoint's."""
    for directory in (run_dir, checkpoint):
        if directory is not None and (directory / PROVENANCE).is_file():
            return read_json(directory / PROVENANCE, "provenance")
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (a resumed run logs those steps again) and a torn last line (what a killed
    run leaves); a damaged line elsewhere is a UserError naming it."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step_of = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):
                print(f"note: dropped the torn last line of {path} (a run stopped while writing it)", file=sys.stderr)
                continue
            raise UserError(f"{path} line {number} is damaged (not a metrics record): remove that line and run the "
                            f"same command again") from None
        if step_of <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))
