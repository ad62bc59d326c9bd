"""Data-parallel ranks for teacher scoring, from the `torchrun` environment.

Ranks only need barriers (each scores its own shards and writes its own files), so the process group is gloo on
the CPU even on GPU nodes, with a long timeout: ranks may finish their shards hours apart.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

from vpmoe.errors import UserError

BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init() -> Ranks:
    """Read RANK / WORLD_SIZE / LOCAL_RANK; join the process group when there is more than one rank."""
    ranks = Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ranks.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return ranks


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()


def finish(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def agree(ranks: Ranks, fn) -> None:
    """Run `fn` on rank 0 and share its outcome: a UserError there is raised on every rank (none is left waiting)."""
    error = None
    if ranks.is_main:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if ranks.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
