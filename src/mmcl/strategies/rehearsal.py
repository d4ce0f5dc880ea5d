"""Rehearsal (P1): train each task on its own data plus a random fraction of every earlier task's data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmcl.data.overlap import ExtraData, earlier_train_splits
from mmcl.seeding import task_seed
from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Example
    from mmcl.engine.context import Context

_PURPOSE = 17  # distinct from the engine's task_seed purposes (0: global seeding, 1: batch order)


def rehearsal_count(n: int, fraction: float) -> int:
    """Examples taken from a task of `n`: round(fraction·n), at least 1 when fraction > 0, at most n."""
    if fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


@dataclass
class RehearsalOptions:
    fraction: float = 0.01
    """Fraction p of each earlier task's training examples added to the current task (P1 used 0.1%, 1%, 10%,
    20%; its tables' "Rehearsal (1%)" is the default here). At least one example per earlier task when p > 0."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"strategies.rehearsal.fraction must be in [0, 1], got {self.fraction}")


@register_strategy("rehearsal")
class Rehearsal(Strategy):
    """Rehearsal (P1, Srivastava et al. 2024, arXiv 2410.19925): data-level mixing of old tasks into the new one.

    Rule: task t trains on its own examples plus a uniform random subset, without replacement, of
    rehearsal_count(N_i, p) = max(1, round(p·N_i)) examples of every earlier task i < t (P1 pre-built such files,
    e.g. 1% of each earlier task). The subsets are drawn by a generator seeded from (run seed, t), so a resumed
    run draws the same ones. State kept across tasks: none (earlier data is re-read from the stream; this needs
    the earlier tasks' training data to stay available).
    """

    Config = RehearsalOptions

    def extra_training_data(self, ctx: Context) -> list[ExtraData]:
        """For the pre-flight leak check: every earlier task's train records may be mixed into a later task."""
        return earlier_train_splits(ctx.stream, ctx.records, "rehearsal")

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:

        g = torch.Generator().manual_seed(task_seed(ctx.seed, ctx.task_index, purpose=_PURPOSE))
        out = list(examples)
        for task in ctx.seen_tasks:
            old = ctx.train_examples(task.name)
            k = rehearsal_count(len(old), self.config.fraction)
            out += [old[i] for i in torch.randperm(len(old), generator=g)[:k].tolist()]
        return out
