"""The teacher-mode curriculum of on-policy distillation: per optimizer step, the mix of reasoning efforts the
prompts get and the longest completion the student may sample.

The schedule is a list of control points (`[curriculum]` in a train config): at step `steps[i]` the effort shares
are (low[i], medium[i], high[i]) and completions stop at max_new_tokens[i]; between two points both move linearly
(the length rounded down), after the last point they stay. The default is medium only at opd.max_new_tokens
throughout. E.g. medium until step 200, then high ramping to 60% by step 600 while 30% medium and 10% low stay:

    steps = [0, 200, 600]
    low = [0.0, 0.0, 0.1]
    medium = [1.0, 1.0, 0.3]
    high = [0.0, 0.0, 0.6]
    max_new_tokens = [4096, 4096, 16384]

The efforts of a step's N prompts (the global batch, all ranks) are exact: round(share * N) of each by largest
remainder (ties to the earlier effort in low, medium, high), in an order shuffled by (seed, step), so that prompt j
of the global batch has the same effort on any number of ranks. The curriculum's position (the next step) is part
of the objective's state, so a resumed run continues mid-schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EFFORTS = ("low", "medium", "high")


@dataclass
class CurriculumSection:
    steps: list[int] = field(default_factory=lambda: [0])  # control points, strictly increasing from 0
    low: list[float] = field(default_factory=lambda: [0.0])
    medium: list[float] = field(default_factory=lambda: [1.0])
    high: list[float] = field(default_factory=lambda: [0.0])
    max_new_tokens: list[int] = field(default_factory=list)  # empty: opd.max_new_tokens at every step

    def validate(self) -> None:
        n = len(self.steps)
        if n == 0 or self.steps[0] != 0 or any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"curriculum.steps must start at 0 and increase strictly, got {self.steps}")
        lengths = {"low": self.low, "medium": self.medium, "high": self.high}
        if self.max_new_tokens:
            lengths["max_new_tokens"] = self.max_new_tokens
        wrong = [key for key, values in lengths.items() if len(values) != n]
        if wrong:
            raise ValueError(f"curriculum.{wrong[0]} has {len(lengths[wrong[0]])} values, curriculum.steps has {n}")
        for i in range(n):
            shares = (self.low[i], self.medium[i], self.high[i])
            if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
                raise ValueError(f"curriculum shares at step {self.steps[i]} (low, medium, high) = {shares} must be "
                                 f">= 0 and sum to 1")
        if self.max_new_tokens and min(self.max_new_tokens) < 1:
            raise ValueError("curriculum.max_new_tokens must be at least 1")


@dataclass(frozen=True)
class Phase:
    shares: dict[str, float]  # effort -> share of the step's prompts
    max_new_tokens: int


class Curriculum:
    def __init__(self, section: CurriculumSection, max_new_tokens: int, seed: int):
        """max_new_tokens: the sampler's capacity (opd.max_new_tokens); the schedule may not exceed it."""
        lengths = section.max_new_tokens or [max_new_tokens] * len(section.steps)
        if max(lengths) > max_new_tokens:
            raise ValueError(f"curriculum.max_new_tokens reaches {max(lengths)}, above opd.max_new_tokens "
                             f"({max_new_tokens}, the sampler's capacity)")
        self.points = np.array(section.steps, dtype=np.float64)
        self.shares = np.array([section.low, section.medium, section.high], dtype=np.float64)  # [3, points]
        self.lengths = np.array(lengths, dtype=np.float64)
        self.seed = seed
        self.position = 0  # the next step to draw

    def phase(self, step: int) -> Phase:
        shares = [float(np.interp(step, self.points, row)) for row in self.shares]
        return Phase(dict(zip(EFFORTS, shares)), int(np.interp(step, self.points, self.lengths)))

    def efforts(self, step: int, n: int) -> list[str]:
        """The efforts of the step's n prompts (global batch order)."""
        shares = np.array(list(self.phase(step).shares.values()))
        exact = shares * n
        counts = np.floor(exact).astype(np.int64)
        order = np.argsort(-(exact - counts), kind="stable")  # largest remainder first; ties: earlier effort
        counts[order[: n - counts.sum()]] += 1
        labels = np.repeat(np.arange(len(EFFORTS)), counts)
        np.random.default_rng([self.seed, step]).shuffle(labels)
        return [EFFORTS[i] for i in labels]

    def next(self, n: int) -> tuple[int, Phase, list[str]]:
        """The next step's (step, phase, efforts of its n prompts); advances the position."""
        step = self.position
        self.position += 1
        return step, self.phase(step), self.efforts(step, n)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
