"""Seeds: one reproducible seed per (run, task, purpose), so a resumed task replays exactly. A leaf module: data,
strategies and the engine all read it."""

from __future__ import annotations

import random

import numpy as np
import torch

SEED_GLOBAL, SEED_BATCH_ORDER, SEED_VALIDATION = 0, 1, 2
"""`task_seed` purposes: global seeding at a task's start, the batch order, the records held out for early stopping.
Strategies use their own purposes (replay 3, MoInCL 5 and 6, rehearsal 17)."""


def task_seed(seed: int, task_index: int, purpose: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, task, purpose)."""
    return (seed * 1_000_003 + (task_index + 1) * 7919 + purpose * 104_729) % 2**32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): round(fraction · n) records (at least 1, at most n − 1) drawn by `seed`, in file order."""
    n = len(records)
    k = min(max(1, round(fraction * n)), n - 1)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
