"""The global gradient norm over gradients that may live on several device meshes (FSDP2 dense weights, expert banks
split over expert-parallel ranks, replicated modules) and clipping by it.

DTensor arithmetic needs operands on one mesh, so gradients are grouped by mesh: each group's norm is reduced to a
plain tensor (`full_tensor`), and the groups' norms combine as the root of the sum of squares.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def by_mesh(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
    return list(groups.values())


def total_norm(grads: list[torch.Tensor]) -> float:
    norms = []
    for group in by_mesh(grads):
        norm = torch.nn.utils.get_total_norm(group)
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def scale_grads_(grads: list[torch.Tensor], factor: float) -> None:
    for group in by_mesh(grads):
        torch._foreach_mul_(group, factor)
