"""Experience replay (P3's replay baseline): a bounded memory of earlier training examples mixed into each task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mmcl.data.overlap import ExtraData, earlier_train_splits
from mmcl.seeding import task_seed
from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Example
    from mmcl.engine.context import Context

SEED_PURPOSE = 3
"""`task_seed(seed, task_index, purpose)` purpose of the memory's sampling (0: task, 1: batch order)."""


@dataclass
class ReplayOptions:
    size: int = 100
    """Memory slots (training examples kept over all earlier tasks). Task t trains on its own examples plus the
    memory, so the replay ratio is size / (size + task examples)."""
    policy: Literal["quota", "reservoir"] = "quota"
    """quota: size split evenly over the finished tasks (earlier tasks get the remainder), each task's share a
    uniform random subset; a new task shrinks the older shares. reservoir: Vitter's algorithm R over the stream of
    every training example seen, so each seen example is in memory with probability size / seen."""

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be an integer >= 1, got {self.size!r}")
        if self.policy not in ("quota", "reservoir"):
            raise ValueError(f"policy must be 'quota' or 'reservoir', got {self.policy!r}")


def quotas(size: int, n_tasks: int) -> list[int]:
    """`size` slots split evenly over `n_tasks`; the first `size % n_tasks` tasks get one more."""
    return [size // n_tasks + (1 if i < size % n_tasks else 0) for i in range(n_tasks)]


def reservoir_offer(
    memory: list[tuple[str, str]], seen: int, items: list[tuple[str, str]], size: int, generator: torch.Generator
) -> tuple[list[tuple[str, str]], int]:
    """Algorithm R (Vitter 1985): offer `items` in order to a reservoir of `size` that has seen `seen` items; the
    k-th item overall (1-based) replaces slot j ~ U{0..k-1} when j < size. One float64 draw per item, in bulk."""
    memory = list(memory)
    draws = torch.rand(len(items), generator=generator, dtype=torch.float64).tolist()
    for item, u in zip(items, draws):
        seen += 1
        if len(memory) < size:
            memory.append(item)
        else:
            j = int(u * seen)
            if j < size:
                memory[j] = item
    return memory, seen


@register_strategy("replay")
class Replay(Strategy):
    """Experience replay, P3's replay baseline ("Continual Instruction Tuning for Large Multimodal Models", He et
    al. 2023; P3's exact ratio semantics are unverified, this is the standard bounded-memory form).

    Rule: after task t its training examples are offered to a memory of `size` examples (policy `quota`: an even
    share per finished task, uniformly sampled, older shares trimmed when a task arrives; policy `reservoir`:
    algorithm R over all examples seen). Task t+1 trains on its own examples plus the whole memory, shuffled
    together into the same global batches, so the loss is the exact token mean over the mix (steps per epoch
    grow by size / batch_size). Sampling uses a generator seeded from (run seed, task index), so a resumed run
    rebuilds the same memory. State across tasks: the memory as (task name, example id) pairs and the seen
    counter, in the JSON metadata (no tensors); examples are re-read from the stream by id.
    """

    Config = ReplayOptions

    def __init__(self, config: ReplayOptions | None = None):
        super().__init__(config)
        self.memory: list[tuple[str, str]] = []  # (task, id); quota: grouped by task in task order
        self.seen = 0  # examples offered so far (reservoir's counter; kept for both policies)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for task, _ in self.memory:
            out[task] = out.get(task, 0) + 1
        return out

    def extra_training_data(self, ctx: Context) -> list[ExtraData]:
        """For the pre-flight leak check: every earlier task's train records may be mixed into a later task."""
        return earlier_train_splits(ctx.stream, ctx.records, "replay memory")

    def state_bytes(self) -> dict[str, int]:
        """Memory held now: the (task, id) pairs of the memory (the examples themselves are the stream's)."""
        return {"memory ids": sum(len(t.encode()) + len(i.encode()) for t, i in self.memory)}

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        if not self.memory:
            return examples
        by_task: dict[str, dict[str, Example]] = {}
        replayed = []
        for task, id_ in self.memory:
            if task not in by_task:
                if task not in ctx.records:
                    raise ValueError(f"replay memory names task {task!r}, which is not in this stream")
                by_task[task] = {e.id: e for e in ctx.train_examples(task)}
            ex = by_task[task].get(id_)
            if ex is None:
                raise ValueError(f"replay memory holds {task}/{id_}, which is no longer in {task}'s training data")
            replayed.append(ex)
        return list(examples) + replayed

    def on_task_end(self, ctx: Context) -> None:

        task = ctx.task.name
        ids = [e.id for e in ctx.train_examples(task)]
        g = torch.Generator().manual_seed(task_seed(ctx.seed, ctx.task_index, SEED_PURPOSE))
        size = self.config.size
        if self.config.policy == "reservoir":
            self.memory, self.seen = reservoir_offer(self.memory, self.seen, [(task, i) for i in ids], size, g)
            return
        order = [t.name for t in ctx.stream.tasks[: ctx.task_index + 1]]  # every finished task, this one last
        share = dict(zip(order, quotas(size, len(order))))
        kept = []
        for t in order[:-1]:
            kept += [m for m in self.memory if m[0] == t][: share[t]]  # each share is in random order: a prefix
        perm = torch.randperm(len(ids), generator=g).tolist()  # is again a uniform subset
        self.memory = kept + [(task, ids[i]) for i in perm[: share[task]]]
        self.seen += len(ids)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"policy": self.config.policy, "size": self.config.size, "seen": self.seen,
                    "memory": [list(m) for m in self.memory]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("policy", self.config.policy) != self.config.policy:
            raise ValueError(f"replay state was written with policy {meta['policy']!r}, config says "
                             f"{self.config.policy!r}")
        self.memory = [(str(t), str(i)) for t, i in meta.get("memory", [])]
        self.seen = int(meta.get("seen", 0))
