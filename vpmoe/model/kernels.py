"""Which kernels run the model: a runtime choice, separate from the architecture config.

attention: "reference" (plain math, any device, the oracle) or "flex" (FlexAttention, CUDA only).
experts:   "padded_bmm" (loop-free gather into an [E, capacity, D] batch, any device and dtype; one host sync for
           the capacity), "grouped_mm" (torch._grouped_mm over expert-sorted tokens, CUDA + bf16, no host sync) or
           "loop" (a Python loop over experts, one host sync per layer: the naive baseline of the benchmark).
Asking for a kernel that cannot run where the model runs is an error, never a silent switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vpmoe.errors import UserError


@dataclass(frozen=True)
class Kernels:
    attention: Literal["reference", "flex"] = "reference"
    experts: Literal["padded_bmm", "grouped_mm", "loop"] = "padded_bmm"

    def __post_init__(self) -> None:
        if self.attention not in ("reference", "flex"):
            raise UserError(f"unknown attention kernel {self.attention!r} (reference or flex)")
        if self.experts not in ("padded_bmm", "grouped_mm", "loop"):
            raise UserError(f"unknown experts kernel {self.experts!r} (padded_bmm, grouped_mm or loop)")

    @classmethod
    def named(cls, name: str) -> Kernels:
        """The kernel sets a config names: "reference", "fast" or "naive"."""
        sets = {"reference": cls, "fast": cls.fast, "naive": cls.naive}
        if name not in sets:
            raise UserError(f"unknown kernels {name!r}: use one of {sorted(sets)}")
        return sets[name]()

    @classmethod
    def fast(cls) -> Kernels:
        return cls(attention="flex", experts="grouped_mm")

    @classmethod
    def naive(cls) -> Kernels:
        """The plain baseline that the benchmark compares the fast path with."""
        return cls(attention="reference", experts="loop")

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.attention == "flex" and device.type != "cuda":
            raise UserError(f"attention kernel 'flex' needs a CUDA device, the model runs on {device.type}; "
                            "use Kernels(attention='reference')")
        if self.experts == "grouped_mm" and (device.type != "cuda" or dtype != torch.bfloat16):
            raise UserError(f"experts kernel 'grouped_mm' needs CUDA and bfloat16, the model runs on {device.type} "
                            f"in {dtype}; use Kernels(experts='padded_bmm')")


def allow_recompiles(limit: int = 64) -> None:
    """Raise torch.compile's recompile limit to at least `limit`: a process compiles one graph per block kind and
    shape (autotune and eval see several), and past the default limit torch would quietly run eager code."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a precision setting computes in: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}: use \"auto\", \"fp32\" or \"bf16\"")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32
