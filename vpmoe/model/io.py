"""Weight I/O: `model.safetensors` (parameters and the expert-bias buffers) plus `config.json` (the ModelConfig).

Loading checks every tensor by name and shape before copying anything; the first mismatch is an error that
names it, so a checkpoint never loads into a model of another shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, model_config_from_dict, model_config_to_dict
from vpmoe.model.kernels import Kernels
from vpmoe.model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(model: Transformer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = json.dumps(model_config_to_dict(model.cfg), indent=2, sort_keys=True)
    (directory / CONFIG_FILE).write_text(config + "\n", encoding="utf-8")
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no {CONFIG_FILE} in {directory}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    return model_config_from_dict(raw, source=str(path))


@torch.no_grad()
def load_weights(model: Transformer, directory: str | Path) -> None:
    """Copy the checkpoint's tensors into `model` (converting dtype and device to the model's)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"no {WEIGHTS_FILE} in {directory}")
    targets = model.state_dict()
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for name, target in targets.items():
            if name not in stored:
                raise UserError(f"{path}: tensor {name!r} of the model is missing from the checkpoint")
            shape = list(f.get_slice(name).get_shape())
            if shape != list(target.shape):
                raise UserError(f"{path}: tensor {name!r} has shape {shape} in the checkpoint but "
                                f"{list(target.shape)} in the model")
        extra = sorted(stored - set(targets))
        if extra:
            raise UserError(f"{path}: tensor {extra[0]!r} of the checkpoint does not exist in the model "
                            f"({len(extra)} such tensors)")
        for name, target in targets.items():
            target.copy_(f.get_tensor(name))


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernels: Kernels | None = None) -> Transformer:
    """Build the model of `config.json` on `device` (fp32, then cast to dtype if given) and load its weights."""
    cfg = load_config(directory)
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    model.to_empty(device=device)
    load_weights(model, directory)
    if dtype is not None:
        model.cast_(dtype)
    return model
