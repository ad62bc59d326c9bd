"""Feed-forward layers: the dense ReLU^2 FFN and the MoE layer (router, expert banks, shared expert).

Router (DeepSeek-V3 style with Megatron-Core semantics, all fp32): scores = sigmoid(x W^T); selection on
scores + expert_bias (a buffer, never trained); group-limited top-k (a group's score is the sum of its top
topk // group_topk selection scores); weights = the chosen unbiased scores normalized to sum 1, times
scaling_factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from vpmoe.model.config import MoESection


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class DenseFFN(nn.Module):
    """down(relu(up(x))^2), no gate."""

    def __init__(self, dim: int, width: int, bias: bool):
        super().__init__()
        self.up = nn.Linear(dim, width, bias=bias)
        self.down = nn.Linear(width, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(relu2(self.up(x)))

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.normal_(self.down.weight, std=out_std)
        for layer in (self.up, self.down):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


@dataclass
class Routing:
    experts: torch.Tensor  # [T, k] int64 chosen experts
    weights: torch.Tensor  # [T, k] fp32, normalized and scaled
    counts: torch.Tensor  # [E] int64 tokens routed to each expert
    logits: torch.Tensor  # [T, E] fp32 router logits (for seq_aux_loss)


class Router(nn.Module):
    def __init__(self, dim: int, moe: MoESection):
        super().__init__()
        self.n_experts, self.topk = moe.n_experts, moe.topk
        self.n_groups, self.group_topk = moe.n_groups, moe.group_topk
        self.scaling_factor = moe.scaling_factor
        self.weight = nn.Parameter(torch.empty(moe.n_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, D] -> Routing. No host synchronization."""
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32 router math (float64 stays float64 in tests)
        logits = x.to(wide) @ self.weight.to(wide).t()
        experts, weights = route(
            logits, self.topk, self.n_groups, self.group_topk, self.scaling_factor, self.expert_bias)
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, experts.flatten(), torch.ones_like(experts.flatten()))
        return Routing(experts, weights, counts, logits)

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: bias_i += rate * sign(mean(n) - n_i), with n the global counts of one step."""
        counts = counts.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(rate * torch.sign(counts.mean() - counts))

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight, std=init_std)
        self.expert_bias.zero_()


def route(
    logits: torch.Tensor,
    topk: int,
    n_groups: int,
    group_topk: int,
    scaling_factor: float,
    expert_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited sigmoid top-k of Megatron-Core's topk_routing_with_score_function. Returns (experts [T, k],
    weights [T, k]); weights are computed from the unbiased scores."""
    n_tokens, n_experts = logits.shape
    scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    selection = scores if expert_bias is None else scores + expert_bias
    if group_limit_binds(topk, n_groups, group_topk):
        group_scores = selection.view(n_tokens, n_groups, -1).topk(topk // group_topk, dim=-1).values.sum(-1)
        groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        expert_mask = group_mask.repeat_interleave(n_experts // n_groups, dim=1)
        selection = selection.masked_fill(~expert_mask, float("-inf"))
    experts = top_k_indices(selection, topk)
    weights = scores.gather(1, experts)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * scaling_factor
    return experts, weights


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(x, k, dim=-1).indices for a small k, as k max-passes: compiled, they fuse into a few reductions,
    far faster than CUDA's general top-k for rows of 256 (the router's shape). No gradient."""
    x = x.detach()
    chosen = []
    for _ in range(k):
        index = x.argmax(-1, keepdim=True)
        chosen.append(index)
        x = x.scatter(-1, index, float("-inf"))
    return torch.cat(chosen, dim=-1)


def group_limit_binds(topk: int, n_groups: int, group_topk: int) -> bool:
    """False when the group limit cannot change the selection, so that it can be skipped: with a group score of
    the top-1 score in the group, the groups of the overall top-k experts hold the k best group scores, and keeping
    group_topk >= k groups keeps them all."""
    return n_groups > group_topk and not (topk // group_topk == 1 and group_topk >= topk)


def seq_aux_loss(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Sequence-level balance loss, logits [B, S, E] -> scalar, averaged over sequences (~1.0 when balanced).

    Per sequence: L = E * sum_i f_i * P_i with s' = sigmoid(logits) normalized over experts, P_i = mean_t s'_ti,
    f_i = (tokens whose plain top-k of s' holds i) / (k * S). Gradients flow through P only."""
    n_experts, seq = logits.shape[-1], logits.shape[1]
    scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    chosen = top_k_indices(scores, topk)
    hits = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)
    f = hits.sum(1) / (topk * seq)  # [B, E]
    p = scores.mean(1)  # [B, E]
    return (n_experts * (f * p).sum(-1)).mean()


class BankWeights(NamedTuple):
    """The tensors one rank computes its experts with: up [E, width, D], down [E, D, width], biases or None."""

    up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertBank(nn.Module):
    """E ReLU^2 experts stored as banks: up [E, width, D], down [E, D, width] (torch Linear layout), with biases."""

    def __init__(self, dim: int, n_experts: int, width: int, bias: bool):
        super().__init__()
        self.up = nn.Parameter(torch.empty(n_experts, width, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, width))
        self.up_bias = nn.Parameter(torch.zeros(n_experts, width)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(n_experts, dim)) if bias else None

    def forward(self, x: torch.Tensor, experts: torch.Tensor, kernel: str) -> torch.Tensor:
        """x [T, D], experts [T, k] -> per-slot outputs [T * k, D] (unweighted; slot t * k + j is token t's j-th
        expert). Under expert parallelism the banks are DTensors split over experts and `experts` index this rank's
        own ones (see model/expert_parallel.py). The result is no view: an FSDP2 unit's output must not be one."""
        topk = experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # slots sorted by expert
        sorted_experts = flat[order]
        unsort = inverse_permutation(order)
        sorted_x = PermutedRows.apply(x, order, unsort, topk)
        weights = self.local_weights()
        # An expert-parallel rank may receive no rows: the padded path computes zero rows (and zero gradients for
        # every expert) on any device, which a grouped GEMM over nothing does not promise.
        if kernel == "grouped_mm" and len(sorted_x):
            y = _grouped(weights, sorted_x, sorted_experts)
        elif kernel == "loop":
            y = _loop(weights, sorted_x, sorted_experts)
        else:
            y = _padded_bmm(weights, sorted_x, sorted_experts)
        return PermutedRows.apply(y, unsort, order, 1)

    def local_weights(self) -> BankWeights:
        """This rank's experts: the banks themselves, or the local part of banks split over expert-parallel ranks
        (a DTensor's local tensor, differentiable)."""
        return BankWeights(*(_local(t) for t in (self.up, self.down, self.up_bias, self.down_bias)))

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.up, std=init_std)
        nn.init.normal_(self.down, std=out_std)
        for bias in (self.up_bias, self.down_bias):
            if bias is not None:
                nn.init.zeros_(bias)


def _grouped(w: BankWeights, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    counts = torch.zeros(w.up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)
    # Biases are gathered per row; in fp32 so that their gradients (an index_add over all rows) accumulate in
    # fp32, not bf16. The fp32 output feeds the fp32 weighted combine anyway.
    # Under autocast (fp32 master weights, bf16 compute) the casts are explicit and autocast is off here, so
    # that its rules for grouped_mm (if any) cannot change the dtypes.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    with torch.autocast("cuda", enabled=False):
        h = _grouped_mm(x.to(dtype), w.up.to(dtype).transpose(-2, -1), offsets)
        if w.up_bias is not None:
            h = SortedBiasAdd.apply(h, w.up_bias, experts, dtype).to(dtype)
        y = _grouped_mm(relu2(h), w.down.to(dtype).transpose(-2, -1), offsets).float()
        if w.down_bias is not None:
            y = SortedBiasAdd.apply(y, w.down_bias, experts, dtype)
    return y


def _loop(w: BankWeights, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(experts, minlength=w.up.shape[0]).tolist()  # the one host sync
    outputs = []
    for e, rows in enumerate(x.split(counts)):
        if not len(rows):
            continue
        h = F.linear(rows, w.up[e], None if w.up_bias is None else w.up_bias[e])
        outputs.append(F.linear(relu2(h), w.down[e], None if w.down_bias is None else w.down_bias[e]))
    return torch.cat(outputs) if outputs else x.new_zeros(0, w.down.shape[1])


def _padded_bmm(w: BankWeights, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    n_experts = w.up.shape[0]
    counts = torch.bincount(experts, minlength=n_experts)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(experts.numel(), device=x.device) - starts[experts]  # rank within its expert
    capacity = int(counts.max()) if experts.numel() else 0  # the one host sync of this path
    batch = x.new_zeros(n_experts, capacity, x.shape[-1])
    batch[experts, slot] = x
    h = batch @ w.up.transpose(-2, -1)
    if w.up_bias is not None:
        h = h + w.up_bias[:, None, :]
    y = relu2(h) @ w.down.transpose(-2, -1)
    if w.down_bias is not None:
        y = y + w.down_bias[:, None, :]
    return y[experts, slot]


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class PermutedRows(torch.autograd.Function):
    """x[index // repeat] for a permutation `index` of range(len(x) * repeat) whose inverse is `inverse`: the
    slots of each token in expert order (repeat = top_k), or expert-ordered rows back in slot order (repeat = 1).
    The backward is a gather too, grad[inverse] summed over each token's `repeat` slots, where autograd's backward
    of index_select is an index_add whose atomics contend (~100 ms of the 80-layer step at accumulation 8)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeat: int):
        ctx.save_for_backward(inverse)
        ctx.repeat = repeat
        return x.index_select(0, index // repeat if repeat > 1 else index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)
        if ctx.repeat > 1:
            rows = rows.view(-1, ctx.repeat, *grad.shape[1:]).sum(1)
        return rows, None, None, None


class SortedBiasAdd(torch.autograd.Function):
    """rows + bias[expert of row] in fp32 (or wider), for the grouped path (CUDA, bf16 compute). The bias gradient
    is a per-expert sum of rows, computed as one_hot(experts)^T @ grad in the compute dtype (the precision of the
    expert weights' own gradients): the index_add that autograd would use makes every row of an expert contend
    for the same fp32 atomics, several times slower than this GEMM."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, compute_dtype: torch.dtype):
        ctx.save_for_backward(experts)
        ctx.dtypes = rows.dtype, bias.dtype, compute_dtype, bias.shape[0]
        wide = torch.promote_types(rows.dtype, torch.float32)
        return rows.to(wide) + bias.to(wide).index_select(0, experts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (experts,) = ctx.saved_tensors
        rows_dtype, bias_dtype, compute_dtype, n_experts = ctx.dtypes
        one_hot = (torch.arange(n_experts, device=grad.device)[:, None] == experts[None, :]).to(compute_dtype)
        grad_bias = one_hot @ grad.to(compute_dtype)  # [E, D]
        return grad.to(rows_dtype), grad_bias.to(bias_dtype), None, None


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped_mm(a, b, offs=offsets)


@dataclass
class MoEStats:
    aux_loss: torch.Tensor  # seq_aux_loss of this layer (scalar, unscaled)
    counts: torch.Tensor  # [E] int64


# (tokens [T, D], chosen experts [T, k], the bank, kernel) -> per-slot outputs [T * k, D]: how the routed experts are
# reached when they live on other ranks (vpmoe.model.expert_parallel.ExpertParallel).
Dispatch = Callable[[torch.Tensor, torch.Tensor, ExpertBank, str], torch.Tensor]


class MoE(nn.Module):
    """shared(x) + sum_k w_k * expert_k(x). `dispatch`, when set, carries the slots to the experts' owners."""

    def __init__(self, dim: int, moe: MoESection, bias: bool):
        super().__init__()
        self.topk = moe.topk
        self.shared = DenseFFN(dim, moe.shared_width, bias)
        self.experts = ExpertBank(dim, moe.n_experts, moe.expert_width, bias)
        self.router = Router(dim, moe)
        self.dispatch: Dispatch | None = None

    def forward(self, x: torch.Tensor, kernel: str = "padded_bmm") -> tuple[torch.Tensor, MoEStats]:
        batch, seq, _ = x.shape
        out, routing = self.mix(x, kernel)
        aux = seq_aux_loss(routing.logits.view(batch, seq, -1), self.topk)
        return out, MoEStats(aux, routing.counts)

    def mix(self, x: torch.Tensor, kernel: str = "padded_bmm") -> tuple[torch.Tensor, Routing]:
        """The layer's output [B, S, D] and the routing that produced it, without the balance statistics
        (decoding needs the output only)."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        routing = self.router(flat)
        if self.dispatch is None:
            routed = self.experts(flat, routing.experts, kernel)
        else:
            routed = self.dispatch(flat, routing.experts, self.experts, kernel)
        routed = routed.view(*routing.experts.shape, dim)  # [T, k, D]
        wide = torch.promote_types(x.dtype, torch.float32)
        mixed = (routed.to(wide) * routing.weights[..., None].to(wide)).sum(1).to(x.dtype)
        return self.shared(x) + mixed.view(batch, seq, dim), routing

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.shared.reset_parameters(init_std, out_std)
        self.experts.reset_parameters(init_std, out_std)
        self.router.reset_parameters(init_std)
