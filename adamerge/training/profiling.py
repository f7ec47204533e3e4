"""Where a learning step's time goes: merge, forward, backward, optimiser and data, summed over the run.

The phases follow FusionBench's profiler report for AdaMerging (merge / forward / backward / data loading), so
the two read side by side. On CUDA, kernels run asynchronously, so a phase is timed by a pair of CUDA events
recorded on the stream; they are read once at the end of the step, so profiling adds no synchronisation
inside the step (which would stall the device between one task's backward and the next task's forward).
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
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device is not None and self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        start_time = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start_time

    def end_step(self) -> None:
        """Count a step and add its CUDA phases (one wait for the step's last event, not one per phase)."""
        for name, start, end in self._pending:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000
        self._pending.clear()
        self.steps += 1

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
