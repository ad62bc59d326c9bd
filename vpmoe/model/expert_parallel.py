"""Expert parallelism: each MoE layer's routed experts split over the ranks of one group, tokens carried to the rank
that owns their expert and back with all-to-all of variable sizes.

    moe.dispatch = ExpertParallel(ep_group, n_experts)   # the bank's tensors: DTensors split on dim 0 over the group

Rank r of the group owns experts [r * E / ep, (r + 1) * E / ep). Per forward, with k slots per token:
  1. slots are sorted by expert (so by owner) and the per-expert counts exchanged (one all-to-all of E integers,
     then one host sync for the split sizes);
  2. the slots' token rows go to their owners (all-to-all, variable sizes); each owner runs its local experts on
     what it received (rows grouped by source rank, then by local expert);
  3. the outputs return the same way (the inverse all-to-all) and are put back in slot order.
Both all-to-alls are autograd functions whose backward is the opposite exchange, so gradients of the token rows
return to their source ranks and each owner's expert weights get the gradients of every token routed to them.
Routing, the router, the shared expert and the weighted combine stay on the token's own rank. The dispatch runs
eagerly inside compiled blocks (torch.compiler.disable): its split sizes are data-dependent host values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vpmoe.model.moe import ExpertBank, PermutedRows, inverse_permutation


class _AllToAll(torch.autograd.Function):
    """Rows [sum(send), ...] -> rows [sum(receive), ...]: send[i] rows to rank i, receive[i] rows from rank i."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _exchange(rows, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def _exchange(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(receive), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


def all_to_all(rows: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """Differentiable variable-size all-to-all over `group` along dim 0."""
    return _AllToAll.apply(rows, send, receive, group)


class ExpertParallel:
    """The MoE layer's dispatch under expert parallelism (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} experts do not split over {self.size} expert-parallel ranks")
        self.n_local = n_experts // self.size
        self.n_experts = n_experts

    @torch.compiler.disable
    def __call__(self, x: torch.Tensor, experts: torch.Tensor, bank: ExpertBank, kernel: str) -> torch.Tensor:
        """x [T, D], experts [T, k] (global ids) -> per-slot outputs [T * k, D] (unweighted), as ExpertBank."""
        topk = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # slots sorted by expert, hence by owner
        per_expert = torch.bincount(flat, minlength=self.n_experts)
        received_per_expert = torch.empty_like(per_expert)  # [source rank, local expert], flattened
        dist.all_to_all_single(received_per_expert, per_expert, group=self.group)
        sizes = torch.stack([per_expert.view(self.size, self.n_local).sum(1),
                             received_per_expert.view(self.size, self.n_local).sum(1)]).tolist()  # the host sync
        send, receive = sizes
        unsort = inverse_permutation(order)
        rows = all_to_all(PermutedRows.apply(x, order, unsort, topk), send, receive, self.group)
        local_experts = torch.arange(self.n_local, device=x.device).repeat(self.size)
        local_experts = local_experts.repeat_interleave(received_per_expert)
        outputs = bank(rows, local_experts[:, None], kernel)  # [rows received, D]
        returned = all_to_all(outputs, receive, send, self.group)  # back in sorted-slot order
        return PermutedRows.apply(returned, unsort, order, 1)
