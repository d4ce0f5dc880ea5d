"""Scoring during a run: one row of the accuracy matrix, and early stopping on validation records."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from mmcl.data.records import Task
from mmcl.engine.context import Context
from mmcl.engine.cost import Cost
from mmcl.engine.train import FitResult, StepHooks
from mmcl.eval.generate import TaskResult


def evaluate_row(ctx: Context, row: int, progress: bool) -> dict[str, float]:
    """Evaluate every train task (and retention task) on its test split; write predictions; return scores."""
    from tqdm.auto import tqdm

    cfg = ctx.config
    tasks = ctx.stream.tasks + (ctx.stream.retention if cfg.eval.retention else [])
    scores = {}
    out_dir = ctx.run_dir / "predictions" / f"row-{row:02d}"
    if ctx.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    label = "initial" if row == 0 else f"after {ctx.stream.tasks[row - 1].name}"
    show = progress and ctx.accelerator.is_main_process
    for task in tqdm(tasks, desc=f"eval {label}", leave=False, disable=not show):
        res = score_task(ctx, task)
        scores[task.name] = round(res.score, 4)
        if ctx.accelerator.is_main_process:
            with (out_dir / f"{task.name}.jsonl").open("w") as f:
                for p in res.predictions:
                    f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return scores


def score_task(ctx: Context, task: Task, split: str = "test") -> TaskResult:
    """One task's score on a split: generated answers and the task's scorer, or, for language tasks, the
    log-likelihood of options or text (`mmcl.eval.language`), or lm-evaluation-harness (`lm_eval:` entries). Every
    process computes the log-likelihood scores in full, so all processes agree without a gather."""
    with ctx.accelerator.autocast():  # evaluate at the run's precision (train.precision), as it trains
        return _score_task(ctx, task, split)


def _score_task(ctx: Context, task: Task, split: str) -> TaskResult:
    from mmcl.eval.language import evaluate_language_task, is_language_task

    if task.lm_eval_task is not None:
        from mmcl.eval.lm_eval_adapter import evaluate_lm_eval_task

        return evaluate_lm_eval_task(ctx.model, ctx.processor, task, batch_size=ctx.config.eval.batch_size,
                                     device=ctx.device, limit=ctx.config.data.test_limit)
    if is_language_task(task):
        return evaluate_language_task(ctx.model, ctx.processor, task, ctx.records[task.name][split],
                                      batch_size=ctx.config.eval.batch_size, device=ctx.device)
    return ctx.score(task, split)


@dataclass
class EarlyStopping:
    """Validation after every epoch of a task: keeps a copy of the trainable weights of the best epoch so far and
    says when `patience` epochs have passed without a better score (P4 trains up to 40 epochs, patience 5)."""

    ctx: Context
    task: Task
    patience: int
    scores: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    time_s: float = 0.0

    def after_epoch(self, epoch: int) -> bool:
        t = time.perf_counter()
        self.scores.append(score_task(self.ctx, self.task, "val").score)
        if self.best_epoch < 0 or self.scores[-1] > self.scores[self.best_epoch]:
            self.best_epoch = len(self.scores) - 1
            self.best = {n: p.detach().clone() for n, p in self.ctx.trainable_parameters()}
        self.time_s += time.perf_counter() - t
        return len(self.scores) - 1 - self.best_epoch >= self.patience

    @classmethod
    def attach(cls, ctx: Context, task: Task, hooks: StepHooks) -> EarlyStopping:
        """Validate after the strategies' own epoch-end hooks (e.g. MoInCL's fusion), so the weights scored are
        the ones kept."""
        stopper = cls(ctx, task, ctx.config.train.early_stopping_patience)
        strategies_epoch = hooks.after_epoch

        def after_epoch(epoch: int) -> bool:
            strategies_epoch(epoch)
            return stopper.after_epoch(epoch)

        hooks.after_epoch = after_epoch
        return stopper

    def finish(self, result: FitResult, cost: Cost, log) -> None:
        """Put the best epoch's weights back (before the strategies' task-end hooks see the model) and record it;
        validation time counts as evaluation, not training."""
        with torch.no_grad():
            for name, p in self.ctx.trainable_parameters():
                p.copy_(self.best[name])
        cost.early_stopping[self.task.name] = {"val_scores": [round(x, 4) for x in self.scores],
                                               "best_epoch": self.best_epoch + 1, "epochs": len(self.scores)}
        result.train_time_s -= self.time_s
        cost.eval_time_s += self.time_s
        early = " (stopped early)" if result.stopped_early else ""
        log(f"{self.task.name}: best validation score {self.scores[self.best_epoch]:.1f} at epoch "
            f"{self.best_epoch + 1} of {len(self.scores)}{early}; its weights are kept")
