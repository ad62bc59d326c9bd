"""The ranks of a job: one process, or the ranks `torchrun` starts, in one process group (the one rank object).

    ranks = init("auto")            # RANK / WORLD_SIZE / LOCAL_RANK from torchrun; joins the group when WORLD_SIZE > 1
    total = all_reduce_sum(t, ranks)
    finish(ranks)

The process group is NCCL when the rank computes on CUDA and gloo otherwise (teacher scoring asks for gloo with a
long timeout: its ranks only meet at barriers, possibly hours apart).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vpmoe.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when visible, else CPU), "cuda" (this rank's GPU, LOCAL_RANK) or "cpu"."""
    if setting not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {setting!r}: use \"auto\", \"cpu\" or \"cuda\"")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device \"cuda\" was asked for but no CUDA device is visible; use \"cpu\" or \"auto\"")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init(device: str = "auto", backend: str | None = None, timeout: datetime.timedelta | None = None) -> Ranks:
    """This process's rank and device; joins the process group when there is more than one rank."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    chosen = resolve_device(device, local)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend or ("nccl" if chosen.type == "cuda" else "gloo"), **kwargs)
    return Ranks(rank, world, local, chosen)


def finish(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree(ranks: Ranks, fn) -> None:
    """Run `fn` on rank 0 and share its outcome: a UserError there is raised on every rank (none is left waiting)."""
    error = None
    if ranks.is_main:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if ranks.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
