"""A short healing stage inside `vpmoe upcycle`: after the conversion, train the new object for a few steps with a
train config ([heal]), then measure it again and make the healed weights the object.

The train config (e.g. the shipped `heal_real`) is loaded with its own `--set` style overrides, then typed changes:
the model is the target's exact config (written as `model.toml` in the healing run directory, so registry overrides
hold), `model.init_from` the converted object, `run.dir` the healing run directory and, when given, `train.steps`.
The run directory keeps the run's metrics and checkpoints beside the object; it must not exist yet (with
upcycle.overwrite, a previous healing run there is replaced).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vpmoe import config as config_io
from vpmoe.artifacts.files import write_text
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig
from vpmoe.provenance import portable_name
from vpmoe.train.config import TrainConfig
from vpmoe.train.trainer import train
from vpmoe.upcycle.config import UpcycleConfig


def run_dir(cfg: UpcycleConfig) -> Path:
    output = Path(cfg.upcycle.output)
    return Path(cfg.heal.run_dir) if cfg.heal.run_dir else output.with_name(f"{output.name}.heal")


def heal(cfg: UpcycleConfig, staging: Path, target_cfg: ModelConfig):
    """Train the object in `staging` and write the healed weights back there; returns (the healed model, record)."""
    h = cfg.heal
    directory = run_dir(cfg)
    if directory.exists():
        if not (cfg.upcycle.overwrite and (directory / "config.toml").is_file()):
            raise UserError(f"healing run directory {directory} exists; choose heal.run_dir or set "
                            f"upcycle.overwrite = true (replaces a previous healing run)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model_toml = write_text(directory / "model.toml", config_io.dumps_toml(target_cfg))
    changes = {"model.config": str(model_toml), "model.init_from": str(staging), "run.dir": str(directory)}
    if h.steps:
        changes["train.steps"] = h.steps
    train_cfg = config_io.load(h.config, TrainConfig, list(h.overrides), kind="train", changes=changes)
    train(train_cfg)
    healed = load_model(directory)
    save_model(healed, staging)
    record = {"config": portable_name(config_io.locate(h.config, "train")), "overrides": list(h.overrides),
              "steps": train_cfg.train.steps, "run_dir": portable_name(directory),
              "dataset": portable_name(train_cfg.data.path)}
    return healed, record
