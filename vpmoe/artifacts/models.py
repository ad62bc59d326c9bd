"""Checkpoint paths and the models they hold: resolve any path to what it is, load it, save a model.

A path is one of
  run        a training run directory (its latest complete and intact checkpoint is used),
  training   a training checkpoint `<run>/checkpoints/step_NNNNNNN/` (DCP, with model_config.json),
  object     a vpmoe checkpoint object or export: `config.json` (our ModelConfig) + `model.safetensors`, or shards
             `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`,
  hf         a Hugging Face model directory (`config.json` of another schema; the teacher and upcycle code read it).
Whatever the kind, `load_model` and `load_weights` give the same tensors, and every name and shape is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vpmoe.artifacts import checkpoints, weights
from vpmoe.artifacts.files import read_json, write_json
from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, model_config_from_dict, model_config_to_dict
from vpmoe.model.kernels import Kernels
from vpmoe.model.transformer import Transformer, build_model

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class Artifact:
    kind: Literal["training", "object", "hf"]
    directory: Path  # the checkpoint itself (a run directory resolves to its latest checkpoint)
    run: Path | None = None  # the run directory of a training checkpoint
    step: int | None = None  # the step of a training checkpoint

    @property
    def label(self) -> str:
        return f"{self.run.name}@{self.step}" if self.run is not None else self.directory.name


def is_vpmoe_config(raw: dict) -> bool:
    """Our ModelConfig (as written to config.json) rather than a Hugging Face config."""
    return {"model", "attention", "ffn"} <= raw.keys()


def config_json(directory: str | Path) -> dict:
    """The raw `config.json` of a model directory (a vpmoe object or export, or a Hugging Face model)."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise UserError(f"model directory {directory} {what}")
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{directory} has no {CONFIG_FILE}: not a model directory")
    return read_json(directory / CONFIG_FILE, "model config")


def resolve(path: str | Path) -> Artifact:
    """What `path` is (see the module doc); a UserError says why when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file, not a checkpoint directory")
    if checkpoints.is_checkpoint(path):
        problem = checkpoints.verify(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}): restore it, or name another step (a run "
                            f"directory resolves to its latest intact checkpoint)")
        run = path.parent.parent if path.parent.name == checkpoints.ROOT else None
        return Artifact("training", path, run, checkpoints.step_of(path))
    if (path / CONFIG_FILE).is_file():
        kind = "object" if is_vpmoe_config(config_json(path)) else "hf"
        return Artifact(kind, path)
    latest = checkpoints.choose(path)
    if latest is None:
        raise UserError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint")
    return Artifact("training", latest, path, checkpoints.step_of(latest))


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a vpmoe checkpoint (training checkpoint, object or export, or a run's latest)."""
    artifact = resolve(path)
    if artifact.kind == "hf":
        raise UserError(f"{artifact.directory} is a Hugging Face model, not a vpmoe checkpoint")
    name = checkpoints.MODEL_CONFIG if artifact.kind == "training" else CONFIG_FILE
    return model_config_from_dict(read_json(artifact.directory / name, "model config"),
                                  str(artifact.directory / name))


@torch.no_grad()
def load_weights(model: Transformer, path: str | Path) -> Artifact:
    """Copy the checkpoint's tensors into `model` (its dtype and device are kept); names and shapes are checked."""
    artifact = resolve(path)
    if artifact.kind == "hf":
        raise UserError(f"{artifact.directory} is a Hugging Face model, not a vpmoe checkpoint: convert it with "
                        "`vpmoe upcycle`")
    if artifact.kind == "object":
        weights.load_state(model.state_dict(), artifact.directory)
        return artifact
    stored = model_config(artifact.directory)
    if stored != model.cfg:
        raise UserError(f"{artifact.directory} holds a {stored.model.name} model of another shape than this one")
    checkpoints.load_model_state(artifact.directory, model.state_dict())  # in place: the tensors share storage
    return artifact


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernels: Kernels | None = None) -> Transformer:
    """Build the model of any vpmoe checkpoint path on `device` in `dtype` (fp32 if None; the fp32-only tensors stay
    fp32) and load it: the values of loading in fp32 and casting (one rounding either way), without the fp32 copy."""
    model = build_model(model_config(path), device=device, dtype=dtype, kernels=kernels, init=False)
    load_weights(model, path)
    return model


def save_model(model: Transformer, directory: str | Path, shard_bytes: int = weights.DEFAULT_SHARD_BYTES) -> Path:
    """Write `config.json` and the (sharded) safetensors of `model` into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights.save_state(directory, model.state_dict().items(), shard_bytes)
    write_json(directory / CONFIG_FILE, model_config_to_dict(model.cfg), sort_keys=True)
    return directory


def read_provenance(directory: str | Path) -> dict | None:
    path = Path(directory) / PROVENANCE_FILE
    return read_json(path, "provenance") if path.is_file() else None
