"""What a run costs: wall, training and evaluation time, steps and samples, parameters, strategy state, peak memory
(written to cost.json and the report).

Every second a method spends counts: `train_time_s` is the training steps (strategy per-step hooks included) and
`strategy_time_s` the strategies' work outside them — teacher copies and pseudo-target generation before a task,
importance passes, merges and EMA swaps after it. `time_per_step_s`, the compare table's s/step, divides both by
the steps, so a method that generates before each task is not cheaper than it is.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Cost:
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    strategy_time_s: float = 0.0
    """Seconds in strategy hooks outside the training steps (task start, what a task trains on, task end)."""
    steps: int = 0
    samples: int = 0
    skipped_steps: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    extra_state_bytes: int = 0
    peak_memory_bytes: int = 0
    strategy_state_bytes: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Per task, per strategy, the bytes of each part of its state while the task trained (teacher, EMA, Ω, ...),
    held in memory whether or not it is checkpointed."""
    early_stopping: dict[str, dict] = field(default_factory=dict)
    """Per task with early stopping: validation score after each epoch, the best epoch (kept), epochs trained."""
    losses: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def timed(self, what: str = "strategy_time_s") -> Iterator[None]:
        """Add the seconds of the `with` block to the field `what`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - start)

    def record_state(self, task: str, strategies: Iterable[Any]) -> dict[str, dict[str, int]]:
        """Note what each strategy's state costs now (call it after a task's training, before its task end, when
        teachers, EMA copies and anchors all exist); returns it for the log."""
        state = {s.name: s.state_bytes() for s in strategies}
        self.strategy_state_bytes[task] = state = {k: v for k, v in state.items() if v}
        return state

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "losses"}
        method_s = self.train_time_s + self.strategy_time_s
        d["time_per_step_s"] = method_s / self.steps if self.steps else None
        d["samples_per_s"] = self.samples / self.train_time_s if self.train_time_s else None
        return d


def describe_state(state: dict[str, dict[str, int]]) -> str:
    """'moincl: teacher 4.5 MiB; llaca: ema 1.2 MiB, prev_grad 1.2 MiB' for the log."""
    mib = 2.0**20
    return "; ".join(f"{s}: " + ", ".join(f"{k} {v / mib:,.1f} MiB" for k, v in parts.items())
                     for s, parts in state.items())


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
