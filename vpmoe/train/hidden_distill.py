"""Hidden-state distillation: which layers pair up, the trainable projections, the cosine term, block capture.

- layer_pairs("auto" | [[s, t], ...], n_student, n_teacher) -> [(s, t), ...] (block indices, 0-based).
  "auto": `count` student blocks at evenly spaced fractional depths, s_k = round(k * L_s / count) - 1 for
  k = 1..count (so the last block, the student's final pre-norm output, is always in), each mapped to teacher block
  round((s + 1) * L_t / L_s) - 1 (at least 0); rounding is half up. A pair names block *outputs*: the embedding
  output is never a member.
- HiddenProjections(pairs, d_student, d_teacher, standardize=False): one Linear(d_student -> d_teacher, no bias) per
  pair (its own optimizer group is the caller's), optional per-dimension standardization of the teacher states by
  running statistics (float64 buffers: count, sum, sum of squares; they are in the state_dict, so resume is exact),
  a ridge least-squares initialization, and forward(student_states, teacher_states) -> [N]: the per-token
  mean over pairs of 1 - cos(W_p h_s, standardize_p(h_t)). States are [N, d] at the positions that carry the term.
  Statistics and the least-squares fit are sums over tokens: `reduce` (e.g. an all-reduce) makes them global so
  every rank holds the same buffers and weights.
- decoder_layers(model) and capture_outputs(modules) (from vpmoe.model.capture, where the in-loop teacher finds
  them too): forward hooks that keep each block's output; hooking the last block gives the final pre-norm output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vpmoe.model.capture import capture_outputs, decoder_layers

AUTO_PAIRS = 5

Reduce = Callable[[torch.Tensor], None]  # sums a float64 tensor over ranks, in place


def layer_pairs(spec: str | Sequence[Sequence[int]], n_student: int, n_teacher: int,
                count: int = AUTO_PAIRS) -> list[tuple[int, int]]:
    """The (student block, teacher block) pairs of `spec`; an explicit list is checked against both depths."""
    if spec == "auto":
        return auto_layer_pairs(n_student, n_teacher, count)
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f'layer pairs must be "auto" or a non-empty list of [student_layer, teacher_layer], '
                         f"got {spec!r}")
    pairs = []
    for i, pair in enumerate(spec):
        if (isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"layer pair {i}: expected [student_layer, teacher_layer] integers, got {pair!r}")
        s, t = pair
        if not 0 <= s < n_student:
            raise ValueError(f"layer pair {i} {list(pair)}: student layer {s} is out of range 0..{n_student - 1}")
        if not 0 <= t < n_teacher:
            raise ValueError(f"layer pair {i} {list(pair)}: teacher layer {t} is out of range 0..{n_teacher - 1}")
        if (s, t) in pairs:
            raise ValueError(f"layer pair {i} {list(pair)} appears twice")
        pairs.append((s, t))
    return pairs


def auto_layer_pairs(n_student: int, n_teacher: int, count: int = AUTO_PAIRS) -> list[tuple[int, int]]:
    if n_student < 1 or n_teacher < 1 or count < 1:
        raise ValueError(f"depths and pair count must be >= 1, got {n_student}, {n_teacher}, {count}")
    count = min(count, n_student)
    students = [_round_half_up(k * n_student, count) - 1 for k in range(1, count + 1)]
    return [(s, max(_round_half_up((s + 1) * n_teacher, n_student) - 1, 0)) for s in students]


def _round_half_up(numerator: int, denominator: int) -> int:
    """round(numerator / denominator), halves up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


class HiddenProjections(nn.Module):
    def __init__(self, pairs: Sequence[tuple[int, int]], student_dim: int, teacher_dim: int,
                 standardize: bool = False, eps: float = 1e-6):
        super().__init__()
        if not pairs:
            raise ValueError("HiddenProjections needs at least one layer pair")
        self.pairs = tuple(pairs)
        self.standardize = standardize
        self.eps = eps
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in self.pairs)
        if standardize:
            shape = (len(self.pairs), teacher_dim)
            self.register_buffer("stat_count", torch.zeros(len(self.pairs), dtype=torch.float64))
            self.register_buffer("stat_sum", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer("stat_sumsq", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def update_statistics(self, teacher_states: Sequence[torch.Tensor], reduce: Reduce | None = None) -> None:
        """Add these teacher states [N, d_t] (one per pair) to the running per-dimension statistics."""
        if not self.standardize:
            raise ValueError("update_statistics needs HiddenProjections(..., standardize=True)")
        self._check(teacher_states, "teacher")
        moments = torch.stack([
            torch.cat([torch.full((1,), h.shape[0], dtype=torch.float64, device=h.device),
                       h.double().sum(0), h.double().square().sum(0)]).to(self.stat_sum.device)
            for h in teacher_states
        ])
        if reduce is not None:
            reduce(moments)
        dim = self.stat_sum.shape[1]
        self.stat_count += moments[:, 0]
        self.stat_sum += moments[:, 1:1 + dim]
        self.stat_sumsq += moments[:, 1 + dim:]

    def target(self, pair: int, h_t: torch.Tensor) -> torch.Tensor:
        """The teacher states the projection aims at (fp32, float64 for float64 states): standardized per dimension
        when enabled. Without statistics (update_statistics never called) the result is NaN, which stops a run at
        its first step."""
        h_t = h_t.detach().to(torch.promote_types(h_t.dtype, torch.float32))
        if not self.standardize:
            return h_t
        mean = self.stat_sum[pair] / self.stat_count[pair]
        var = (self.stat_sumsq[pair] / self.stat_count[pair] - mean.square()).clamp(min=0)
        return (h_t - mean.to(h_t.dtype)) * torch.rsqrt(var + self.eps).to(h_t.dtype)

    @torch.no_grad()
    def fit_least_squares(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                          ridge: float = 1e-4, reduce: Reduce | None = None) -> None:
        """W_p = argmin ||h_s W^T - target(h_t)||^2 + lambda ||W||^2 with lambda = ridge * trace(H_s^T H_s) / d_s,
        solved in float64 from the normal equations (summed by `reduce` over ranks before the solve)."""
        self._check(student_states, "student")
        self._check(teacher_states, "teacher")
        for p, (h_s, h_t) in enumerate(zip(student_states, teacher_states, strict=True)):
            weight = self.proj[p].weight
            x = h_s.detach().double().to(weight.device)
            y = self.target(p, h_t.to(weight.device)).double()
            normal = torch.cat([x.T @ x, x.T @ y], dim=1)  # [d_s, d_s + d_t]
            if reduce is not None:
                reduce(normal)
            d_s = x.shape[1]
            gram, cross = normal[:, :d_s], normal[:, d_s:]
            lam = ridge * gram.diagonal().sum() / d_s
            solution = torch.linalg.solve(gram + lam * torch.eye(d_s, dtype=gram.dtype, device=gram.device), cross)
            weight.copy_(solution.T)

    def pair_losses(self, student_states: Sequence[torch.Tensor],
                    teacher_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """1 - cos(W_p h_s, target_p(h_t)) per pair and token, [P, N] in fp32."""
        self._check(student_states, "student")
        self._check(teacher_states, "teacher")
        rows = []
        for p, (h_s, h_t) in enumerate(zip(student_states, teacher_states, strict=True)):
            projected = self.proj[p](h_s).float()
            rows.append(1.0 - F.cosine_similarity(projected, self.target(p, h_t.to(projected.device)), dim=-1))
        return torch.stack(rows)

    def forward(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-token hidden-state term [N]: the mean over pairs of 1 - cos."""
        return self.pair_losses(student_states, teacher_states).mean(0)

    @torch.no_grad()
    def weight_norms(self) -> torch.Tensor:
        """Frobenius norm of each projection, [P] (for logging)."""
        return torch.stack([proj.weight.float().norm() for proj in self.proj])

    def _check(self, states: Sequence[torch.Tensor], side: str) -> None:
        dim = self.proj[0].weight.shape[1 if side == "student" else 0]
        if len(states) != len(self.pairs) or any(h.dim() != 2 or h.shape[1] != dim for h in states):
            shapes = [list(h.shape) for h in states]
            raise ValueError(f"{len(self.pairs)} {side} states [N, {dim}] expected (one per layer pair), "
                             f"got {shapes}")


__all__ = ["AUTO_PAIRS", "HiddenProjections", "auto_layer_pairs", "capture_outputs", "decoder_layers",
           "layer_pairs"]
