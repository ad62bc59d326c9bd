"""The student as a training stage runs it, prepared in one place and in one order, with every compatibility check
here: layout -> kernels -> initial weights -> frozen groups -> bf16 working copy (one process) -> activation checkpointing
-> expert parallelism -> compiled blocks (CUDA graphs) -> FSDP2 sharding. When the run computes in bf16, the weights
are cast once per optimizer step, never per micro-batch: in one process the model holds a bf16 working copy of fp32
master weights (vpmoe.train.master); sharded, FSDP2 gathers bf16 from fp32 shards and reduces in fp32. The model file
knows nothing of any of it.

Sharding (vpmoe.train.mesh): every block is an FSDP2 unit over the dense mesh, the root holds embedding, final norm
and head. Under expert parallelism each MoE layer's banks become DTensors split over the ep ranks on dim 0 (whole
experts) and an FSDP2 unit of their own over the ranks that hold the same experts; their gradients are divided by the
world size (each expert's gradient already sums the tokens of its whole EP group), so every gradient is the
global-batch gradient. With bf16 gathers, units whose math must stay fp32 (the router; attention with GRAPE
log-frequencies) gather in fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from vpmoe.artifacts.models import load_weights
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.model import Kernels, build_model
from vpmoe.model.config import ModelConfig
from vpmoe.model.expert_parallel import ExpertParallel
from vpmoe.model.kernels import compute_dtype
from vpmoe.model.moe import MoE
from vpmoe.model.naming import freeze_group
from vpmoe.model.transformer import FP32_NAMES
from vpmoe.train.config import ParallelSection, TrainSection
from vpmoe.train.master import Masters
from vpmoe.train.mesh import Layout, Meshes, build_meshes, resolve_layout


def check(train: TrainSection, ranks: Ranks, layout: Layout = Layout()) -> None:
    """Refuse settings that cannot run here, before anything is built."""
    device = ranks.device
    if layout.ep > 1 and train.kernels == "naive":
        raise UserError("train.kernels = \"naive\" (a Python loop over experts) does not run under expert "
                        "parallelism (parallel.ep > 1): use \"reference\" or \"fast\"")
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
    """The compute dtype of bf16 autocast (over a bf16 working copy, or FSDP2's bf16 gathers), or None (plain fp32)."""
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


def build_student(model_cfg: ModelConfig, train: TrainSection, ranks: Ranks, init_from: str = "",
                  parallel: ParallelSection | None = None):
    """The model ready for the loop. Returns (model, names of frozen parameters, the fp32 masters of its bf16 working
    copy or None: the module whose parameters the optimizer updates is `masters or model`)."""
    n_experts = model_cfg.moe.n_experts if model_cfg.moe.enabled else None
    layout = resolve_layout(parallel or ParallelSection(), ranks.world_size, n_experts)
    check(train, ranks, layout)
    model = build_model(model_cfg, device=ranks.device, kernels=Kernels.named(train.kernels))
    if init_from:
        load_weights(model, init_from)
    frozen = apply_freeze(model, train.freeze)
    compute = autocast_dtype(train, ranks.device)
    masters = Masters(model, compute) if compute is not None and not ranks.distributed else None
    model.activation_checkpointing = train.activation_checkpointing
    meshes = build_meshes(layout, ranks.device.type) if ranks.distributed else None
    if meshes is not None and ranks.is_main:
        print(f"mesh: {layout.describe()}")
    if meshes is not None and layout.ep > 1:
        apply_expert_parallel(model, meshes)
    if train.compile != "off":
        model.compile_blocks(cuda_graphs=train.compile == "cudagraphs")
    if meshes is not None:
        shard(model, meshes, compute, ranks.world_size)
    return model, frozen, masters


def moe_layers(model: nn.Module) -> list[MoE]:
    return [block.mlp for block in model.layers if isinstance(block.mlp, MoE)]


def apply_expert_parallel(model: nn.Module, meshes: Meshes) -> None:
    """Split each MoE layer's banks over the ep ranks (dim 0: whole experts; every rank built the same full model,
    so each keeps its slice without communication) and route its slots through all-to-all."""
    for moe in moe_layers(model):
        bank = moe.experts
        for name, param in list(bank.named_parameters(recurse=False)):
            split = distribute_tensor(param.detach(), meshes.ep, [Shard(0)], src_data_rank=None)
            setattr(bank, name, nn.Parameter(split, requires_grad=param.requires_grad))
        moe.dispatch = ExpertParallel(meshes.ep.get_group(), moe.router.n_experts)


def shard(model: nn.Module, meshes: Meshes, compute: torch.dtype | None, world_size: int) -> None:
    """FSDP2 units (see the module docstring). `compute` is the autocast dtype, gathered in when set (bf16)."""
    gathered = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        if isinstance(block.mlp, MoE) and isinstance(block.mlp.experts.up, DTensor):
            experts = fully_shard(block.mlp.experts, mesh=meshes.experts, mp_policy=gathered)
            experts.set_gradient_divide_factor(float(world_size))
            if meshes.dense.device_type != "cuda" and meshes.experts.size(-1) > 1:
                # gloo has no pre-multiplied sum: sum, then divide. Not on one shard rank, where torch 2.13's FSDP2
                # divides once without a reduce-scatter and then again after it.
                experts.set_force_sum_reduction_for_comms(True)
        if compute is not None:
            if isinstance(block.mlp, MoE):
                fully_shard(block.mlp.router, mesh=meshes.dense, mp_policy=fp32)
            if any(name in FP32_NAMES for name, _ in block.attn.named_parameters(recurse=False)):
                fully_shard(block.attn, mesh=meshes.dense, mp_policy=fp32)
        fully_shard(block, mesh=meshes.dense, mp_policy=gathered)
    fully_shard(model, mesh=meshes.dense, mp_policy=gathered)
