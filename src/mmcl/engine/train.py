"""Training one task: global batches in a seeded order, gradient accumulation, clipping, schedule, loss policy.

The loss of a step is the token-level cross-entropy averaged over every supervised token of the *global* batch,
however it is split into micro-batches and processes, so 1 process x 4 micro-batches and 2 processes x 2 give the
same gradients (up to float summation order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, DistributedType

from mmcl.config import TrainConfig
from mmcl.data.batching import Batch, Collator, Example
from mmcl.models.losses import token_cross_entropy_sum

_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
"""Engines where the plain optimizer is exact: `fit` accumulates gradients itself and DDP averages them in
backward, so Accelerate's optimizer wrapper would only add per-step Python overhead (measured in BENCHMARKS.md)."""


class Preempted(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint; resume with `mmcl run --resume`."""


@dataclass
class ResumePoint:
    """Where a task's training stopped: the step reached and everything needed to continue bitwise."""

    step: int
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor
    losses: list[float]
    samples: int
    skipped_steps: int


TrainState = ResumePoint  # what `on_checkpoint` receives is exactly what a resume needs


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; raised before the optimizer step, so weights are untouched."""


@dataclass
class StepHooks:
    """Per-step callbacks the continual engine plugs in (strategies); all optional."""

    transform_batch: Callable[[Batch], Batch] | None = None
    task_loss: Callable[[Batch, object], torch.Tensor | None] | None = None
    extra_loss: Callable[[Batch, object], torch.Tensor | None] | None = None
    after_step: Callable[[int], None] | None = None
    after_epoch: Callable[[int], bool | None] | None = None
    """Called with the epoch index after the last step of each epoch (and of a last epoch cut short by max_steps);
    returning True ends the task's training there (early stopping)."""


@dataclass
class FitResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    train_time_s: float = 0.0
    samples: int = 0
    stopped_early: bool = False


def lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def steps_for(n_examples: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def global_batches(n: int, cfg: TrainConfig, seed: int) -> list[list[int]]:
    """Index lists of every global batch of the task, reshuffled each epoch by a generator seeded from `seed`."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return out[: steps_for(n, cfg)]


def fit(
    model: torch.nn.Module,
    examples: Sequence[Example],
    collator: Collator,
    cfg: TrainConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    hooks: StepHooks | None = None,
    label: str = "train",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    resume: ResumePoint | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train `model`'s trainable parameters on `examples` for the configured epochs/steps; returns losses.

    With `resume`, training continues at `resume.step` of the same seeded plan of batches with the optimizer,
    scheduler and RNG states restored, so the rest of the task consumes exactly the batches an uninterrupted run
    would. Every `checkpoint_every` steps, and when `should_stop()` turns true (preemption), `on_checkpoint`
    receives the complete training state; after a stop request, `Preempted` is raised.
    """
    from tqdm.auto import tqdm

    hooks = hooks or StepHooks()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient (check model.train and strategies)")
    if not examples:
        raise ValueError(f"{label}: no training examples")
    plan = global_batches(len(examples), cfg, seed)
    supervised = [sum(1 for t in e.labels[1:] if t != -100) for e in examples]  # tokens the loss averages over
    total = len(plan)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, total, warmup))
    result = FitResult(steps=0)
    first = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        first = resume.step
        result.losses = list(resume.losses)
        result.steps, result.samples, result.skipped_steps = resume.step, resume.samples, resume.skipped_steps
    wrapped = accelerator.prepare_model(model)
    if accelerator.distributed_type not in _PLAIN or accelerator.mixed_precision == "fp16":
        optimizer = accelerator.prepare_optimizer(optimizer)  # sharded engines and loss scaling need the wrapper
    dtype = next(model.parameters()).dtype
    world, rank = accelerator.num_processes, accelerator.process_index
    consecutive_skips = 0
    start = time.perf_counter()
    bar = tqdm(total=total, initial=first, desc=label, disable=not progress or not accelerator.is_main_process,
               leave=False)
    model.train()
    for step in range(first, total):
        idx = plan[step]
        shard = idx[rank::world]  # every rank builds the same global batch and takes its slice
        n_tokens = sum(supervised[i] for i in idx)
        micro = [shard[k :: cfg.grad_accum] for k in range(cfg.grad_accum)]
        step_loss = torch.zeros((), device=accelerator.device)
        for k, mb in enumerate(micro):
            if not mb:
                continue
            batch = collator([examples[i] for i in mb]).to(accelerator.device, dtype)
            if hooks.transform_batch:
                batch = hooks.transform_batch(batch)
            sync = k == len(micro) - 1
            with accelerator.no_sync(wrapped) if not sync and world > 1 else _null():
                with accelerator.autocast():
                    out = wrapped(batch.input_ids, batch.attention_mask,
                                  **model.media_inputs(batch.media, batch.input_ids))
                    task_sum = hooks.task_loss(batch, out) if hooks.task_loss else None
                    if task_sum is None:
                        task_sum = token_cross_entropy_sum(out.logits, batch.labels)
                    # DDP averages gradients over ranks, so scale by world size to get the global-token mean.
                    loss = task_sum * world / max(n_tokens, 1)
                    extra = hooks.extra_loss(batch, out) if hooks.extra_loss else None
                    if extra is not None:
                        loss = loss + extra / len(micro)
                accelerator.backward(loss)
            step_loss += loss.detach() / world
        grad_norm = (
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            if cfg.max_grad_norm
            else torch.zeros((), device=accelerator.device)
        )
        # one host sync per step: the loss for the log and the finiteness check of loss and gradients
        loss_value, norm_value = torch.stack([step_loss, torch.as_tensor(grad_norm, dtype=step_loss.dtype)]).tolist()
        if world > 1:
            loss_value = float(accelerator.reduce(torch.tensor(loss_value, device=accelerator.device), "sum"))
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if not finite:
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            if cfg.on_nonfinite == "raise":
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"{label}: non-finite {what} ({loss_value if what == 'loss' else norm_value}) at step "
                    f"{step + 1}/{total}; the optimizer step was not taken. Lower train.lr, check the data, or set "
                    "train.on_nonfinite=skip"
                )
            optimizer.zero_grad(set_to_none=True)
            result.skipped_steps += 1
            consecutive_skips += 1
            if consecutive_skips >= cfg.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{label}: {consecutive_skips} non-finite steps in a row (last at step {step + 1}); aborting. "
                    "Lower train.lr or check the data"
                )
        else:
            consecutive_skips = 0
            optimizer.step()
            scheduler.step()
            if hooks.after_step:
                hooks.after_step(step)
            optimizer.zero_grad(set_to_none=True)
            result.samples += len(idx)
            result.losses.append(loss_value)
            if on_step:
                on_step(step, loss_value)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        result.steps = step + 1
        if hooks.after_epoch and (result.steps % per_epoch == 0 or result.steps == total):
            result.stopped_early = bool(hooks.after_epoch(step // per_epoch)) and result.steps < total
        bar.update(1)
        if result.stopped_early:
            break
        stop = should_stop() if should_stop else False
        if on_checkpoint and result.steps < total and (stop or (checkpoint_every and result.steps % checkpoint_every == 0)):
            on_checkpoint(TrainState(result.steps, optimizer.state_dict(), scheduler.state_dict(),
                                     torch.get_rng_state(), list(result.losses), result.samples, result.skipped_steps))
        if stop and result.steps < total:
            bar.close()
            raise Preempted(f"{label}: stopped after step {result.steps}/{total} on request")
    bar.close()
    result.train_time_s = time.perf_counter() - start
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
