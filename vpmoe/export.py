"""Checkpoints in, models out: resolve any checkpoint path, load it, and `vpmoe export` it.

A checkpoint path is one of
  - a run directory (its latest complete checkpoint is used),
  - a training checkpoint `<run>/checkpoints/step_NNNNNNN/` (DCP, with model_config.json),
  - a checkpoint object or an export: `config.json` + `model.safetensors`, or sharded
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
`vpmoe export PATH --out DIR` writes the last form plus the tokenizer files; loading it back is bit-exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vpmoe import provenance
from vpmoe import tokenizer as tk
from vpmoe.errors import UserError
from vpmoe.model import Kernels, Transformer, load_config
from vpmoe.model.config import model_config_from_dict, model_config_to_dict
from vpmoe.train import checkpoint

INDEX_FILE = "model.safetensors.index.json"
MODEL_CONFIG = "model_config.json"  # the ModelConfig inside a training checkpoint


def resolve(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / "config.json").is_file() or (path / checkpoint.COMPLETE).is_file():
        return path
    latest = checkpoint.latest(path)
    if latest is None:
        raise UserError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint")
    return latest


def _empty_model(cfg, device, kernels) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    model.to_empty(device=device)
    return model


def load_any(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             kernels: Kernels | None = None) -> tuple[Transformer, Path]:
    """Load the model of any checkpoint path (see module doc); returns it and the resolved directory."""
    directory = resolve(path)
    if (directory / checkpoint.COMPLETE).is_file():
        import torch.distributed.checkpoint as dcp

        raw = json.loads((directory / MODEL_CONFIG).read_text())
        model = _empty_model(model_config_from_dict(raw, str(directory / MODEL_CONFIG)), device, kernels)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(directory))
    else:
        model = _empty_model(load_config(directory), device, kernels)
        load_tensors(model, directory)
    if dtype is not None:
        model.cast_(dtype)
    return model, directory


def _tensor_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, for a single or sharded safetensors checkpoint."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserError(f"no model.safetensors or {INDEX_FILE} in {directory}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def load_tensors(model: Transformer, directory: Path) -> None:
    files = _tensor_files(directory)
    targets = model.state_dict()
    for name in targets:
        if name not in files:
            raise UserError(f"{directory}: tensor {name!r} of the model is missing from the checkpoint")
    extra = sorted(set(files) - set(targets))
    if extra:
        raise UserError(f"{directory}: tensor {extra[0]!r} of the checkpoint does not exist in the model")
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                shape = list(f.get_slice(name).get_shape())
                if shape != list(targets[name].shape):
                    raise UserError(f"{file}: tensor {name!r} has shape {shape}, the model wants "
                                    f"{list(targets[name].shape)}")
                targets[name].copy_(f.get_tensor(name))


def export(path: str | Path, out: str | Path, shard_bytes: int = 2 << 30) -> Path:
    """Write config.json, model safetensors (sharded above `shard_bytes`), tokenizer files and provenance."""
    model, source = load_any(path)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new --out directory")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(model_config_to_dict(model.cfg), indent=2, sort_keys=True) + "\n")
    _write_tokenizer(tmp)
    parent = source / "provenance.json"
    parents = [json.loads(parent.read_text())] if parent.is_file() else []
    record = provenance.record("export", "", parents=parents, source=provenance.portable_name(source),
                               shards=len(shards))
    (tmp / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out)
    return out


def _write_tokenizer(directory: Path) -> None:
    """The o200k ranks (hash-checked), the special-token table, and a Hugging Face `tokenizer.json`."""
    shutil.copyfile(tk.ranks_path(), directory / tk.RANKS_FILE)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer": "o200k_harmony", "vocab_size": tk.VOCAB_SIZE, "ranks_file": tk.RANKS_FILE,
        "ranks_sha256": tk.O200K_SHA256, "pattern": tk.O200K_PATTERN, "special_tokens": tk.special_tokens(),
        "eos_token_id": tk.RETURN, "pad_token_id": tk.EOD,
    }, indent=1) + "\n")
    tk.write_hf_tokenizer(directory)
