"""The continual loop: row 0 evaluates the untouched model; then each task trains, every task is evaluated (one row
of the accuracy matrix), and a checkpoint is written. Strategies act only through their hooks.
"""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from mmcl.config import ConfigError, RunConfig
from mmcl.data.records import DataError, Problem, Stream, Task, format_problems, read_records
from mmcl.engine import checkpoint as ck
from mmcl.engine.context import Context
from mmcl.engine.train import FitResult, Preempted, ResumePoint, StepHooks, fit
from mmcl.eval.metrics import compute_metrics
from mmcl.models.builder import conversation_format, count_parameters, media_loader
from mmcl.strategies import Strategy, build_strategies, check_composition, check_task_options

# Config fields that may differ on resume without changing what the run computes.
HARMLESS_ON_RESUME = {"name", "output_dir", "checkpoint.keep_last", "checkpoint.every_steps", "eval.batch_size"}
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers (SLURM) expect from a job that stopped on SIGTERM


class StrategyError(RuntimeError):
    """An exception inside a strategy hook, re-raised with the strategy and hook named."""


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


def task_seed(seed: int, task_index: int, purpose: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, task, purpose), so a resumed task replays exactly."""
    return (seed * 1_000_003 + (task_index + 1) * 7919 + purpose * 104_729) % 2**32


SEED_VALIDATION = 2
"""`task_seed` purpose of the records held out for early stopping (0: global seeding, 1: batch order)."""


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): round(fraction · n) records (at least 1, at most n − 1) drawn by `seed`, in file order."""
    n = len(records)
    k = min(max(1, round(fraction * n)), n - 1)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def call(strategies: list[Strategy], hook: str, *args):
    """Call `hook` on every strategy in order; name the strategy and hook if it raises."""
    results = []
    for s in strategies:
        try:
            results.append(getattr(s, hook)(*args))
        except Exception as e:
            raise StrategyError(f"strategy {s.name!r} failed in hook {hook!r}: {type(e).__name__}: {e}") from e
    return results


# -- pre-flight -------------------------------------------------------------------------------------------------------


def preflight(stream: Stream, cfg: RunConfig, log=print) -> tuple[dict[str, dict[str, list]], list[Problem]]:
    """Read and check every split the run will touch, before any training. Raises DataError listing every bad
    record (policy `error`), or drops them (policy `skip`) unless too many are bad."""
    records: dict[str, dict[str, list]] = {}
    problems: list[Problem] = []
    validate = cfg.train.early_stopping_patience > 0
    for task in stream.all_tasks:
        records[task.name] = {}
        splits = ["train", "test"] if task in stream.tasks else ["test"]
        if validate and task in stream.tasks and "val" in task.splits:
            splits.append("val")
        for split in splits:
            limit = cfg.data.train_limit if split == "train" else cfg.data.test_limit
            good, bad = read_records(task, split, allow_outside_root=cfg.data.allow_outside_root, limit=limit)
            problems += bad
            total = len(good) + len(bad)
            if bad and cfg.data.on_bad_record == "skip" and len(bad) > cfg.data.max_bad_fraction * total:
                raise DataError(
                    f"{task.name}/{split}: {len(bad)} of {total} records are bad, more than data.max_bad_fraction="
                    f"{cfg.data.max_bad_fraction}:\n{format_problems(bad)}"
                )
            if not good:
                raise DataError(f"{task.name}/{split}: no usable records in {task.split_path(split)}")
            records[task.name][split] = good
    if validate:
        for index, task in enumerate(stream.tasks):
            if "val" not in records[task.name]:
                if len(records[task.name]["train"]) < 2:
                    raise DataError(f"{task.name}: early stopping holds training records out for validation, but "
                                    "the task has fewer than 2; add a val split or set train.early_stopping_patience=0")
                records[task.name]["train"], records[task.name]["val"] = hold_out(
                    records[task.name]["train"], cfg.train.val_fraction, task_seed(cfg.seed, index, SEED_VALIDATION))
    if problems and cfg.data.on_bad_record == "error":
        raise DataError(
            f"{len(problems)} bad record(s); fix them, or set data.on_bad_record=skip to leave them out:\n"
            + format_problems(problems)
        )
    if problems:
        log(f"skipping {len(problems)} bad record(s) (listed in skipped.jsonl)")
    return records, problems


# -- evaluation -------------------------------------------------------------------------------------------------------


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
        res = ctx.score(task, "test")
        scores[task.name] = round(res.score, 4)
        if ctx.accelerator.is_main_process:
            with (out_dir / f"{task.name}.jsonl").open("w") as f:
                for p in res.predictions:
                    f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return scores


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
        self.scores.append(self.ctx.score(self.task, "val").score)
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


# -- the loop ---------------------------------------------------------------------------------------------------------


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and key != "strategies":
            diffs += _config_diff(a, b, key + ".")
        elif a != b:
            diffs.append((key, b, a))
    return diffs


def check_resume_config(saved: dict, current: dict, log=print) -> None:
    """Refuse to resume with a config that changes what the run computes; harmless differences only warn."""
    diffs = _config_diff(saved, current)
    fatal = [d for d in diffs if d[0] not in HARMLESS_ON_RESUME]
    for key, now, then in diffs:
        if key in HARMLESS_ON_RESUME:
            log(f"warning: {key} differs from the checkpoint (config={now!r}, checkpoint={then!r}); using config")
    if fatal:
        lines = "\n".join(f"  {k}: config={now!r}, checkpoint={then!r}" for k, now, then in fatal)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's:\n{lines}\n"
                         "Resume with the original config, or start a new run (another name or output_dir).")


def make_accelerator(cfg: RunConfig) -> Accelerator:
    from accelerate import DistributedDataParallelKwargs

    # A stream mixing modalities trains every projector it uses, but a batch of one task feeds only its own: DDP must
    # expect parameters without a gradient in a step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.precision, kwargs_handlers=[ddp])


def set_trainable(model: torch.nn.Module, parts: list[str], modalities: set[str] | None = None) -> None:
    """Train the named parts; encoders and projectors only of the modalities the stream uses (an unused trainable
    tensor would cost optimizer memory and stall DDP's gradient reduction)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        module = getattr(model, part)
        if part in ("encoders", "projectors") and modalities is not None:
            used = {m for m in modalities if m in module}
            used |= {model.modalities[m].encoder for m in modalities
                     if part == "encoders" and getattr(model.modalities.get(m), "encoder", None)}
            module = torch.nn.ModuleList([module[m] for m in sorted(used) if m in module])
        for p in module.parameters():
            p.requires_grad_(True)


class StopRequest:
    """Turns SIGTERM into a flag the training loop checks after each step; later signals are ignored, so a second
    SIGTERM cannot interrupt the checkpoint being written. The previous handler is restored on exit."""

    def __init__(self, log=print):
        self.requested = False
        self.log = log
        self._previous = None

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.log("SIGTERM: finishing the current step, then writing a checkpoint")
        self.requested = True

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Run a continual stream end to end and return the run directory."""
    with StopRequest(log) as stop:
        return _run(cfg, resume, progress, log, stop)


def build_context(
    cfg: RunConfig, accelerator: Accelerator | None = None, *, progress: bool = False, log=print
) -> tuple[Context, list[Strategy], list[Problem]]:
    """Everything a run needs before its first task: stream, model, checked records, strategies (composition
    refused here if it can't run), trainable parts and the context strategies see. Tests and benchmarks use it too,
    so they exercise exactly what a run does."""
    from mmcl.builtin import resolve_model, resolve_stream

    accelerator = accelerator or make_accelerator(cfg)
    stream = resolve_stream(cfg.data, progress=progress, log=log)
    model, tokenizer = resolve_model(cfg.model, run_dir=cfg.run_dir, progress=progress, log=log)
    model.to(accelerator.device)
    records, problems = preflight(stream, cfg, log=log)
    strategies = build_strategies(cfg.strategies)
    modalities = {t.modality for t in stream.all_tasks if t.modality != "text"}
    unread = sorted(modalities - set(model.modalities))
    if unread:
        raise ConfigError(
            f"the stream has {', '.join(unread)} tasks but the model reads only {sorted(model.modalities)}; use a model "
            "with those encoders (the built-in tiny model reads image, audio and video; "
            "mmcl.models.builder.assemble_model composes one from Hugging Face parts)"
        )
    check_composition(strategies, modalities=modalities, num_processes=accelerator.num_processes)
    check_task_options(strategies, [t.name for t in stream.tasks])
    no_mid = [s.name for s in strategies if not s.supports_mid_task_resume]
    if cfg.checkpoint.every_steps and no_mid:
        raise ConfigError(f"checkpoint.every_steps: {no_mid} cannot resume inside a task; use 0 (task boundaries)")
    set_trainable(model, cfg.model.train, modalities)
    ctx = Context(cfg, accelerator, model, tokenizer, conversation_format(model, tokenizer), stream, cfg.run_dir,
                  media_loader(model), records)
    return ctx, strategies, problems


def _run(cfg: RunConfig, resume: bool, progress: bool, log, stop: StopRequest) -> Path:
    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if not resume and (run_dir / "config.yaml").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another name/output_dir"
        )
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    say = log if main else (lambda *_: None)
    seed_everything(cfg.seed)

    ctx, strategies, problems = build_context(cfg, accelerator, progress=progress, log=say)
    model, stream = ctx.model, ctx.stream
    no_mid = [s.name for s in strategies if not s.supports_mid_task_resume]
    call(strategies, "prepare_model", ctx)

    rows: list[dict] = []
    cost = Cost()
    start_task, mid = 0, None
    protect: set[str] = set()
    if resume:
        found = ck.latest_valid(ckpt_root, warn=say)
        if found is None:
            raise ck.CheckpointError(f"no valid checkpoint in {ckpt_root} to resume from")
        path, state = found
        protect.add(path.name)  # never pruned while this run goes on
        check_resume_config(state["config"], cfg.to_dict(), log=say)
        tensors, state = ck.load_checkpoint(path)
        rows = state["rows"]
        cost = Cost(**{k: v for k, v in state["cost"].items() if k in Cost.__dataclass_fields__})
        if state.get("mid_task"):
            start_task = state["task_index"]
            ctx.task_index = start_task
            seed_everything(task_seed(cfg.seed, start_task))
            _use_task(strategies, stream.tasks[start_task].name)
            call(strategies, "on_task_start", ctx)  # rebuilds per-task structure (e.g. a fresh adapter) first
            mid = _resume_point(tensors, state)
        else:
            start_task = state["task_index"] + 1
        _restore(ctx, strategies, tensors, state)
        where = f"inside task {start_task + 1} at step {mid.step}" if mid else f"after task {start_task}"
        say(f"resuming {run_dir} {where} from checkpoint {path.name}")
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.dump())
        with (run_dir / "skipped.jsonl").open("w") as f:
            for p in problems:
                f.write(json.dumps({"file": str(p.file), "line": p.line, "id": p.id, "reason": p.reason}) + "\n")

    if not rows:
        t = time.perf_counter()
        rows.append({"after": None, "scores": evaluate_row(ctx, 0, progress)})
        cost.eval_time_s += time.perf_counter() - t
        _write_results(ctx, rows, cost, main)

    def save(name: str, order: int, extra: dict, extra_tensors: dict | None = None) -> None:
        if main:
            strategy_tensors, strategy_meta = _strategy_state(strategies)
            cost.extra_state_bytes = sum(v.numel() * v.element_size() for v in strategy_tensors.values())
            ck.save_checkpoint(
                ckpt_root, name, {"model": model.state_dict(), "strategies": strategy_tensors, **(extra_tensors or {})},
                {"order": order, "rows": rows, "config": cfg.to_dict(), "strategies": strategy_meta,
                 "cost": cost.to_json() | {"losses": cost.losses}, **extra},
                keep_last=cfg.checkpoint.keep_last, protect=protect,
            )
        accelerator.wait_for_everyone()

    for index in range(start_task, len(stream.tasks)):
        ctx.task_index = index
        task = stream.tasks[index]
        if mid is None:
            seed_everything(task_seed(cfg.seed, index))
            _use_task(strategies, task.name)
            call(strategies, "on_task_start", ctx)
        examples = ctx.train_examples(task.name)
        for s in strategies:
            examples = call([s], "train_examples", ctx, examples)[0]
        trainable, total = count_parameters(model)
        cost.trainable_parameters = max(cost.trainable_parameters, trainable)
        cost.total_parameters = total
        ctx.task_step = mid.step if mid else 0

        def on_step(step: int, loss: float) -> None:
            ctx.step += 1
            ctx.task_step = step + 1

        def on_checkpoint(state, index=index, task=task) -> None:
            cost.losses[task.name] = state.losses
            opt_tensors, opt_meta = _optimizer_state(state.optimizer)
            save(f"task-{index + 1:02d}-{task.name}-step-{state.step:06d}", index * 1_000_000 + state.step,
                 {"mid_task": True, "task_index": index, "task": task.name, "task_step": state.step,
                  "optimizer": opt_meta, "scheduler": state.scheduler, "losses_in_task": state.losses,
                  "samples_in_task": state.samples, "skipped_in_task": state.skipped_steps},
                 {"optimizer": opt_tensors, "rng": {"torch": state.rng}})
            say(f"checkpoint inside {task.name} at step {state.step}")

        hooks = _step_hooks(ctx, strategies)
        stopper = EarlyStopping.attach(ctx, task, hooks) if cfg.train.early_stopping_patience else None
        result = fit(
            model, examples, ctx.collator(), cfg.train, accelerator,
            seed=task_seed(cfg.seed, index, purpose=1), hooks=hooks,
            label=f"task {index + 1}/{len(stream.tasks)} {task.name}", progress=progress, on_step=on_step,
            resume=mid, checkpoint_every=cfg.checkpoint.every_steps,
            on_checkpoint=on_checkpoint if not no_mid and stopper is None else None,
            should_stop=lambda: stop.requested,
        )
        mid = None
        accelerator.free_memory()
        if stopper is not None:
            stopper.finish(result, cost, say)
        call(strategies[::-1], "on_task_end", ctx)  # unwind like a stack: a wrapper listed first (lora) ends last
        cost.train_time_s += result.train_time_s
        cost.steps += result.steps
        cost.samples += result.samples
        cost.skipped_steps += result.skipped_steps
        cost.losses[task.name] = result.losses

        t = time.perf_counter()
        rows.append({"after": task.name, "scores": evaluate_row(ctx, index + 1, progress)})
        cost.eval_time_s += time.perf_counter() - t
        cost.wall_time_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        cost.peak_memory_bytes = max(cost.peak_memory_bytes, peak_memory_bytes())
        _write_results(ctx, rows, cost, main)
        save(f"task-{index + 1:02d}-{task.name}", index * 1_000_000 + 999_999, {"task_index": index, "task": task.name})
        if main:
            ck.remove_mid_task(ckpt_root, keep=protect)
        last = rows[-1]["scores"]
        say(f"after {task.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in last.items()))
        if stop.requested and index + 1 < len(stream.tasks):
            raise Preempted(f"stopped on request after task {index + 1}; resume with --resume {run_dir}")

    cost.wall_time_s += time.perf_counter() - t0
    _write_results(ctx, rows, cost, main)
    if main:
        from mmcl.report import write_report

        write_report(run_dir)
    return run_dir


def _use_task(strategies: list[Strategy], task_name: str) -> None:
    for s in strategies:
        s.use_task(task_name)


def _optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors-ready tensors plus JSON (never pickled)."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _resume_point(tensors: dict, state: dict) -> ResumePoint:
    per_param: dict[int, dict] = {}
    for key, v in tensors.get("optimizer", {}).items():
        pid, name = key.split("/", 1)
        per_param.setdefault(int(pid), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        pid, name = key.split("/", 1)
        per_param.setdefault(int(pid), {})[name] = v
    return ResumePoint(
        step=state["task_step"],
        optimizer={"state": per_param, "param_groups": state["optimizer"]["param_groups"]},
        scheduler=state["scheduler"],
        rng=tensors["rng"]["torch"],
        losses=state["losses_in_task"],
        samples=state["samples_in_task"],
        skipped_steps=state["skipped_in_task"],
    )


def _step_hooks(ctx: Context, strategies: list[Strategy]) -> StepHooks:
    def transform(batch):
        for s in strategies:
            batch = call([s], "transform_batch", ctx, batch)[0]
        return batch

    def task_loss(batch, out):
        values = [v for v in call(strategies, "task_loss", ctx, batch, out) if v is not None]
        return values[0] if values else None

    def extra(batch, out):
        values = [v for v in call(strategies, "extra_loss", ctx, batch, out) if v is not None]
        return sum(values) if values else None

    def epoch_end(epoch: int) -> None:  # strategies never end training early; see EarlyStopping
        call(strategies, "on_epoch_end", ctx)

    return StepHooks(transform, task_loss, extra, lambda step: call(strategies, "after_optimizer_step", ctx),
                     epoch_end)


def _strategy_state(strategies: list[Strategy]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {}
    for s in strategies:
        t, m = call([s], "state_dict")[0]
        tensors.update({f"{s.name}/{k}": v for k, v in t.items()})
        meta[s.name] = m
    return tensors, meta


def _restore(ctx: Context, strategies: list[Strategy], tensors: dict, state: dict) -> None:
    try:
        ctx.model.load_state_dict(tensors["model"], strict=True)
    except RuntimeError as e:
        raise ck.CheckpointError(f"checkpoint weights do not fit the model built from this config: {e}") from e
    for s in strategies:
        mine = {k.split("/", 1)[1]: v for k, v in tensors["strategies"].items() if k.startswith(s.name + "/")}
        call([s], "load_state_dict", mine, state["strategies"].get(s.name, {}))
    ctx.step = sum(len(v) for v in state["cost"].get("losses", {}).values())


def _write_results(ctx: Context, rows: list[dict], cost: Cost, main: bool) -> None:
    if not main:
        return
    matrix = {"tasks": [t.name for t in ctx.stream.tasks], "retention": [t.name for t in ctx.stream.retention]
              if ctx.config.eval.retention else [], "rows": rows}
    ck.write_json_atomic(ctx.run_dir / "matrix.json", matrix)
    ck.write_json_atomic(ctx.run_dir / "metrics.json", compute_metrics(matrix))
    ck.write_json_atomic(ctx.run_dir / "cost.json", cost.to_json())
    ck.write_json_atomic(ctx.run_dir / "losses.json", cost.losses)
