"""Where a learning step's time goes: merge, forward, backward, optimiser and data, summed over the run.

The phases follow FusionBench's profiler report for AdaMerging (merge / forward / backward / data loading), so
the two read side by side. On CUDA each phase boundary synchronises the device (kernels run asynchronously;
without it the time would land in whichever phase waits next), which costs a little throughput.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = ("data", "merge", "forward", "backward", "optimizer")


class StepProfile:
    """Accumulated seconds per phase; ``report()`` gives totals, per-step means and fractions of the total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {phase: 0.0 for phase in PHASES}
        self.steps = 0
        self.device: torch.device | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def report(self) -> dict[str, dict[str, float]]:
        total = sum(self.seconds.values())
        return {
            phase: {
                "seconds": value,
                "ms_per_step": 1000 * value / max(self.steps, 1),
                "fraction": value / total if total > 0 else 0.0,
            }
            for phase, value in self.seconds.items()
        }

    def state(self) -> dict[str, float | int]:
        return {**self.seconds, "steps": self.steps}

    def load_state(self, state: dict[str, float | int]) -> None:
        self.steps = int(state["steps"])
        self.seconds = {phase: float(state[phase]) for phase in PHASES}
