"""Calling the strategies: one typed method per hook, each naming the strategy and hook when it raises."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mmcl.data.batching import Batch, Example
from mmcl.engine.context import Context
from mmcl.engine.train import StepHooks
from mmcl.strategies import Strategy


class StrategyError(RuntimeError):
    """An exception inside a strategy hook, re-raised with the strategy and hook named."""


@contextmanager
def _guard(strategy: Strategy, hook: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        raise StrategyError(f"strategy {strategy.name!r} failed in hook {hook!r}: {type(e).__name__}: {e}") from e


class Strategies(Sequence[Strategy]):
    """The run's strategies in order, with the engine's hook calls (task end unwinds in reverse, like a stack)."""

    def __init__(self, strategies: Sequence[Strategy]):
        self._items = list(strategies)

    def __getitem__(self, i):  # type: ignore[override]
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def prepare_model(self, ctx: Context) -> None:
        for s in self._items:
            with _guard(s, "prepare_model"):
                s.prepare_model(ctx)

    def use_task(self, task_name: str) -> None:
        for s in self._items:
            s.use_task(task_name)

    def on_task_start(self, ctx: Context) -> None:
        for s in self._items:
            with _guard(s, "on_task_start"):
                s.on_task_start(ctx)

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        for s in self._items:
            with _guard(s, "train_examples"):
                examples = s.train_examples(ctx, examples)
        return examples

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        for s in self._items:
            with _guard(s, "transform_batch"):
                batch = s.transform_batch(ctx, batch)
        return batch

    def task_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        """The first strategy's replacement of the task loss, if any (at most one may replace it)."""
        for s in self._items:
            with _guard(s, "task_loss"):
                value = s.task_loss(ctx, batch, outputs)
            if value is not None:
                return value
        return None

    def extra_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        total = None
        for s in self._items:
            with _guard(s, "extra_loss"):
                value = s.extra_loss(ctx, batch, outputs)
            if value is not None:
                total = value if total is None else total + value
        return total

    def after_optimizer_step(self, ctx: Context) -> None:
        for s in self._items:
            with _guard(s, "after_optimizer_step"):
                s.after_optimizer_step(ctx)

    def on_epoch_end(self, ctx: Context) -> None:
        for s in self._items:
            with _guard(s, "on_epoch_end"):
                s.on_epoch_end(ctx)

    def on_task_end(self, ctx: Context) -> None:
        for s in reversed(self._items):  # a wrapper listed first (lora) is unwound last
            with _guard(s, "on_task_end"):
                s.on_task_end(ctx)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every strategy's state, tensors keyed `<strategy>/<name>`."""
        tensors, meta = {}, {}
        for s in self._items:
            with _guard(s, "state_dict"):
                t, m = s.state_dict()
            tensors.update({f"{s.name}/{k}": v for k, v in t.items()})
            meta[s.name] = m
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for s in self._items:
            mine = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(s.name + "/")}
            with _guard(s, "load_state_dict"):
                s.load_state_dict(mine, meta.get(s.name, {}))

    def step_hooks(self, ctx: Context) -> StepHooks:
        """The per-step callbacks `fit` calls. Strategies never end training early (see EarlyStopping)."""
        return StepHooks(
            transform_batch=lambda batch: self.transform_batch(ctx, batch),
            task_loss=lambda batch, out: self.task_loss(ctx, batch, out),
            extra_loss=lambda batch, out: self.extra_loss(ctx, batch, out),
            after_step=lambda step: self.after_optimizer_step(ctx),
            after_epoch=lambda epoch: self.on_epoch_end(ctx),
        )
