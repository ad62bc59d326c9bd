"""The layout of a training job's ranks and the one DeviceMesh built from it.

    layout = resolve_layout(cfg.parallel, ranks.world_size, n_experts)   # exit 2 when it cannot hold
    meshes = build_meshes(layout, ranks.device.type)

The mesh is (dp_replicate, dp_shard, ep), ep innermost (the ranks of one EP group are neighbours: one node). Every
rank reads its own micro-batches (data parallel over the whole world); what differs per axis is what is sharded:
  dense    everything but the routed experts: FSDP2 over dp_shard x ep (flattened), replicated over dp_replicate
  experts  the routed expert banks: split over ep (each rank owns n_experts / ep whole experts), FSDP2 over dp_shard
           inside each EP group, replicated over dp_replicate
A size-1 axis is kept (FSDP2 over one rank is a no-op), so the code is the same for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vpmoe.errors import UserError
from vpmoe.train.config import ParallelSection

AXES = ("dp_replicate", "dp_shard", "ep")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep

    def describe(self) -> str:
        """One line for logs and `vpmoe doctor`."""
        text = (f"{self.world_size} rank(s): dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x ep "
                f"{self.ep}; dense weights sharded over {self.dp_shard * self.ep}")
        if self.ep > 1:
            text += f", routed experts split over {self.ep} and sharded over {self.dp_shard}"
        if self.dp_replicate > 1:
            text += f", {self.dp_replicate} replicas (HSDP)"
        return text


def resolve_layout(parallel: ParallelSection, world_size: int, n_experts: int | None) -> Layout:
    """The layout `[parallel]` asks for on `world_size` ranks; n_experts is None for a dense model. UserError (exit
    2) names the keys when it cannot hold."""
    rest = parallel.dp_replicate * parallel.ep
    dp_shard = parallel.dp_shard or world_size // rest
    if dp_shard < 1 or parallel.dp_replicate * dp_shard * parallel.ep != world_size:
        shown = parallel.dp_shard if parallel.dp_shard else f"0 (auto: {world_size} // {rest})"
        raise UserError(
            f"parallel.dp_replicate x parallel.dp_shard x parallel.ep = {parallel.dp_replicate} x {shown} x "
            f"{parallel.ep} must equal the world size, {world_size} (torchrun's --nnodes x --nproc_per_node; 1 for "
            f"a single process)")
    if parallel.ep > 1 and n_experts is None:
        raise UserError(f"parallel.ep = {parallel.ep} needs a MoE model; this one is dense (set parallel.ep = 1)")
    if n_experts is not None and n_experts % parallel.ep:
        raise UserError(f"parallel.ep = {parallel.ep} does not divide moe.n_experts = {n_experts}")
    return Layout(parallel.dp_replicate, dp_shard, parallel.ep)


@dataclass(frozen=True)
class Meshes:
    """The sub-meshes of the one (dp_replicate, dp_shard, ep) mesh that parallelize() shards with."""

    dense: DeviceMesh  # FSDP2 mesh of all but the routed experts: [dp_shard x ep] or [dp_replicate, dp_shard x ep]
    experts: DeviceMesh  # FSDP2 mesh of the expert banks: [dp_shard] or [dp_replicate, dp_shard]
    ep: DeviceMesh  # the expert-parallel group of this rank
    replicate: bool  # HSDP (dp_replicate > 1)


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    """Collective: every rank calls it, with the same layout."""
    mesh = init_device_mesh(device_type, (layout.dp_replicate, layout.dp_shard, layout.ep), mesh_dim_names=AXES)
    flat = mesh["dp_shard", "ep"]._flatten("dp_shard_ep")
    replicate = layout.dp_replicate > 1
    dense = mesh["dp_replicate", "dp_shard_ep"] if replicate else flat
    experts = mesh["dp_replicate", "dp_shard"] if replicate else mesh["dp_shard"]
    return Meshes(dense, experts, mesh["ep"], replicate)
