"""Process setup for training: one process on CPU/GPU, or `torchrun` ranks sharded with FSDP2."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vpmoe.errors import UserError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> Dist:
    """Join the `torchrun` process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU) and pick the device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = \"cuda\" but no CUDA device is visible; use \"cpu\" or \"auto\"")
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world, local, chosen)


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def shard_model(model: torch.nn.Module, d: Dist) -> None:
    """FSDP2 over the data-parallel mesh: each block is one unit, the root holds embedding, final norm and head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("dp",))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def finish(d: Dist) -> None:
    if d.distributed and dist.is_initialized():
        dist.destroy_process_group()
