"""Joint multi-task training on every task seen so far: the usual upper bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmcl.data.overlap import ExtraData, earlier_train_splits
from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Example
    from mmcl.engine.context import Context


@register_strategy("joint")
class Joint(Strategy):
    """Joint training (upper bound): at task t, train on the union of the training data of tasks 1..t.

    Rule: minimise the mean cross-entropy over all records of tasks 1..t, continuing from the weights after task
    t-1 (cost grows with t: task t makes ~t times the steps of sequential). Not continual learning — it stores
    all past data — but it shows how much of the forgetting a method could still recover. State: none (the data
    is re-read from the stream).
    """

    def extra_training_data(self, ctx: Context) -> list[ExtraData]:
        """For the pre-flight leak check: every earlier task's train records may be mixed into a later task."""
        return earlier_train_splits(ctx.stream, ctx.records, "joint training")

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        earlier = [e for t in ctx.seen_tasks for e in ctx.train_examples(t.name)]
        return earlier + examples
