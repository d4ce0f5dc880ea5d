"""What a run costs: wall, training and evaluation time, steps and samples, parameters, strategy state, peak memory
(written to cost.json and the report)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch


@dataclass
class Cost:
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    steps: int = 0
    samples: int = 0
    skipped_steps: int = 0
    trainable_parameters: int = 0
    total_parameters: int = 0
    extra_state_bytes: int = 0
    peak_memory_bytes: int = 0
    early_stopping: dict[str, dict] = field(default_factory=dict)
    """Per task with early stopping: validation score after each epoch, the best epoch (kept), epochs trained."""
    losses: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "losses"}
        d["time_per_step_s"] = self.train_time_s / self.steps if self.steps else None
        d["samples_per_s"] = self.samples / self.train_time_s if self.train_time_s else None
        return d


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
