"""The continual loop: row 0 evaluates the untouched model; then each task trains, every task is evaluated (one row
of the accuracy matrix), and a checkpoint is written. Strategies act only through their hooks; set-up, resume,
signals and scoring live in their own modules beside this one.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from mmcl.config import RunConfig
from mmcl.engine import checkpoint as ck
from mmcl.engine.context import Context
from mmcl.engine.cost import Cost, describe_state, peak_memory_bytes
from mmcl.engine.environment import environment
from mmcl.engine.evaluation import EarlyStopping, evaluate_row
from mmcl.engine.resume import check_resume_config, optimizer_state, restore, resume_point
from mmcl.engine.setup import build_context, make_accelerator, restrict_trainable
from mmcl.engine.signals import PREEMPTED_EXIT_CODE, StopRequest
from mmcl.engine.tracking import Tracker
from mmcl.engine.train import Preempted, fit
from mmcl.eval.metrics import compute_metrics
from mmcl.models.builder import count_parameters
from mmcl.seeding import SEED_BATCH_ORDER, seed_everything, task_seed

__all__ = ["run", "build_context", "PREEMPTED_EXIT_CODE", "Cost"]


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Run a continual stream end to end and return the run directory."""
    with StopRequest(log) as stop:
        return _run(cfg, resume, progress, log, stop)


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
    if main:
        ck.check_writable(run_dir)  # an unwritable output dir fails now, not at the first checkpoint
    seed_everything(cfg.seed)

    ctx, strategies, problems = build_context(cfg, accelerator, progress=progress, log=say)
    model, stream = ctx.model, ctx.stream
    no_mid = [s.name for s in strategies if not s.supports_mid_task_resume]
    strategies.prepare_model(ctx)

    rows: list[dict] = []
    cost = Cost()
    start_task, mid = 0, None
    protect: set[str] = set()
    if main:
        swept = ck.sweep_stale(ckpt_root)
        if swept:
            say(f"removed {len(swept)} incomplete checkpoint save(s) left by an interrupted run: {', '.join(swept)}")
    found = ck.latest_valid(ckpt_root, warn=say) if resume else None
    if resume and found is None:  # autoresume: a job that always passes --resume, before its first checkpoint
        say(f"no complete checkpoint in {ckpt_root} yet: starting {run_dir} from the beginning with its saved config")
        resume = False
    if found is not None:
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
            strategies.use_task(stream.tasks[start_task].name)
            strategies.on_task_start(ctx)  # rebuilds per-task structure (e.g. a fresh adapter) first
            mid = resume_point(tensors, state)
        else:
            start_task = state["task_index"] + 1
        restore(ctx, strategies, tensors, state)
        where = f"inside task {start_task + 1} at step {mid.step}" if mid else f"after task {start_task}"
        say(f"resuming {run_dir} {where} from checkpoint {path.name}")
    if not resume and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.dump())
        with (run_dir / "skipped.jsonl").open("w") as f:
            for p in problems:
                f.write(json.dumps({"file": str(p.file), "line": p.line, "id": p.id, "reason": p.reason}) + "\n")

    if main:
        ck.write_json_atomic(run_dir / "environment.json", environment(cfg, accelerator))
    tracker = Tracker(accelerator, cfg, ctx.step)
    if not rows:
        t = time.perf_counter()
        rows.append({"after": None, "scores": evaluate_row(ctx, 0, progress)})
        cost.eval_time_s += time.perf_counter() - t
        _write_results(ctx, rows, cost, main)
        tracker.row(ctx.step, rows[0]["scores"])

    def save(name: str, order: int, extra: dict, extra_tensors: dict | None = None) -> None:
        if main:
            strategy_tensors, strategy_meta = strategies.state_dict()
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
            strategies.use_task(task.name)
            with cost.timed():  # teacher copies, fresh adapters: the method's seconds, counted in s/step
                strategies.on_task_start(ctx)
        # a stream entry `{task: DIR, train: [PARTS]}`: only those parts learn in this task (LLaVA stage 1)
        restricted = restrict_trainable(model, task.train_parts) if task.train_parts else []
        own = ctx.train_examples(task.name)
        with cost.timed():  # pseudo targets generated before the task, replayed or rehearsed examples
            examples = strategies.train_examples(ctx, own)
        trainable, total = count_parameters(model)
        cost.trainable_parameters = max(cost.trainable_parameters, trainable)
        cost.total_parameters = total
        ctx.task_step = mid.step if mid else 0

        def on_step(step: int, loss: float) -> None:
            ctx.step += 1
            ctx.task_step = step + 1
            tracker.loss(ctx.step, loss)

        def on_checkpoint(state, index=index, task=task) -> None:
            cost.losses[task.name] = state.losses
            opt_tensors, opt_meta = optimizer_state(state.optimizer)
            save(f"task-{index + 1:02d}-{task.name}-step-{state.step:06d}", index * 1_000_000 + state.step,
                 {"mid_task": True, "task_index": index, "task": task.name, "task_step": state.step,
                  "optimizer": opt_meta, "scheduler": state.scheduler, "losses_in_task": state.losses,
                  "samples_in_task": state.samples, "skipped_in_task": state.skipped_steps},
                 {"optimizer": opt_tensors, "rng": {"torch": state.rng}})
            say(f"checkpoint inside {task.name} at step {state.step}")

        hooks = strategies.step_hooks(ctx)
        stopper = EarlyStopping.attach(ctx, task, hooks) if cfg.train.early_stopping_patience else None
        result = fit(
            model, examples, ctx.collator(), replace(cfg.train, lr=task.train_lr) if task.train_lr else cfg.train,
            accelerator,
            seed=task_seed(cfg.seed, index, SEED_BATCH_ORDER), hooks=hooks,
            label=f"task {index + 1}/{len(stream.tasks)} {task.name}", progress=progress, on_step=on_step,
            resume=mid, checkpoint_every=cfg.checkpoint.every_steps,
            on_checkpoint=on_checkpoint if not no_mid and stopper is None else None,
            should_stop=lambda: stop.agreed(accelerator),
        )
        mid = None
        accelerator.free_memory()
        if stopper is not None:
            stopper.finish(result, cost, say)
        state = cost.record_state(task.name, strategies)  # teachers, EMA copies and anchors all exist now
        if state:
            say(f"strategy state during {task.name}: {describe_state(state)}")
        with cost.timed():  # importance passes, merges, EMA swaps
            strategies.on_task_end(ctx)
        for p in restricted:
            p.requires_grad_(True)
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
        tracker.row(ctx.step, rows[-1]["scores"])
        save(f"task-{index + 1:02d}-{task.name}", index * 1_000_000 + 999_999, {"task_index": index, "task": task.name})
        if main:
            ck.remove_mid_task(ckpt_root, keep=protect)
        last = rows[-1]["scores"]
        say(f"after {task.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in last.items()))
        if stop.agreed(accelerator) and index + 1 < len(stream.tasks):
            raise Preempted(f"stopped on request after task {index + 1}; resume with --resume {run_dir}")

    cost.wall_time_s += time.perf_counter() - t0
    _write_results(ctx, rows, cost, main)
    tracker.finish(run_dir, ctx.step)
    if main:
        from mmcl.report import write_report

        write_report(run_dir)
    return run_dir


def _write_results(ctx: Context, rows: list[dict], cost: Cost, main: bool) -> None:
    if not main:
        return
    matrix = {"tasks": [t.name for t in ctx.stream.tasks], "retention": [t.name for t in ctx.stream.retention]
              if ctx.config.eval.retention else [], "rows": rows}
    ck.write_json_atomic(ctx.run_dir / "matrix.json", matrix)
    ck.write_json_atomic(ctx.run_dir / "metrics.json", compute_metrics(matrix))
    ck.write_json_atomic(ctx.run_dir / "cost.json", cost.to_json())
    ck.write_json_atomic(ctx.run_dir / "losses.json", cost.losses)
