"""The student as a training stage runs it, prepared in one place and in one order, with every compatibility check
here: kernels -> initial weights -> frozen groups -> activation checkpointing -> compiled blocks (CUDA graphs) ->
FSDP2 sharding. The model file knows nothing of any of it.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from vpmoe.artifacts.models import load_weights
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.model import Kernels, build_model
from vpmoe.model.config import ModelConfig
from vpmoe.model.kernels import compute_dtype
from vpmoe.model.naming import freeze_group
from vpmoe.train.config import TrainSection


def check(train: TrainSection, ranks: Ranks) -> None:
    """Refuse settings that cannot run here, before anything is built."""
    device = ranks.device
    if train.precision == "bf16" and device.type != "cuda":
        raise UserError("train.precision = \"bf16\" is for CUDA; use \"fp32\" or \"auto\" on the CPU")
    if train.compile == "cudagraphs" and ranks.distributed:
        raise UserError("train.compile = \"cudagraphs\" runs on one GPU only (FSDP manages gradients itself); "
                        "with several ranks use compile = \"on\"")
    if train.compile == "cudagraphs" and device.type != "cuda":
        raise UserError(f"train.compile = \"cudagraphs\" needs CUDA, the model runs on {device.type}; "
                        "use compile = \"off\"")
    try:
        Kernels.named(train.kernels).check(device, autocast_dtype(train, device) or torch.float32)
    except UserError as e:
        raise UserError(f"train.kernels = \"{train.kernels}\" cannot run here ({e}); set train.kernels = "
                        "\"reference\" (any device) or run on a GPU with precision bf16") from None


def autocast_dtype(train: TrainSection, device: torch.device) -> torch.dtype | None:
    """bf16 autocast over fp32 master weights, or None (plain fp32)."""
    dtype = compute_dtype(train.precision, device)
    return dtype if dtype != torch.float32 else None


def apply_freeze(model: torch.nn.Module, groups: list[str]) -> list[str]:
    """Freeze every parameter of the named groups; a group that matches nothing is an error."""
    frozen, hit = [], set()
    for name, param in model.named_parameters():
        group = freeze_group(name)
        if group in groups:
            param.requires_grad_(False)
            frozen.append(name)
            hit.add(group)
    missing = [g for g in groups if g not in hit]
    if missing:
        raise UserError(f"train.freeze: group {missing[0]!r} matches no parameter of this model")
    return frozen


def build_student(model_cfg: ModelConfig, train: TrainSection, ranks: Ranks, init_from: str = ""):
    """The model ready for the loop. Returns (model, names of frozen parameters)."""
    check(train, ranks)
    model = build_model(model_cfg, device=ranks.device, kernels=Kernels.named(train.kernels))
    if init_from:
        load_weights(model, init_from)
    frozen = apply_freeze(model, train.freeze)
    model.activation_checkpointing = train.activation_checkpointing
    if train.compile != "off":
        model.compile_blocks(cuda_graphs=train.compile == "cudagraphs")
    if ranks.distributed:
        shard(model, ranks)
    return model, frozen


def shard(model: torch.nn.Module, ranks: Ranks) -> None:
    """FSDP2 over the data-parallel mesh: each block is one unit, the root holds embedding, final norm and head."""
    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,), mesh_dim_names=("dp",))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
