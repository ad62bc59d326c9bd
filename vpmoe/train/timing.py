"""Time spent per phase of a training step (forward, backward, optimizer), without host synchronization.

On CUDA each phase is bracketed by CUDA events and read back only when `read()` is called (at log time, where the
trainer synchronizes anyway); on the CPU it is wall-clock time.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            begin = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - begin

    def read(self) -> dict[str, float]:
        """Milliseconds per phase summed since the last read (waits for the recorded GPU work)."""
        totals = {name: 1000 * seconds for name, seconds in self._seconds.items()}
        for name, start, end in self._events:
            end.synchronize()
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end)
        self._events.clear()
        self._seconds.clear()
        return totals
