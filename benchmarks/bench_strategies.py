"""Strategy overheads: per-step time of each continual-learning strategy against plain sequential fine-tuning, the
cost of the EWC/MAS importance pass against one training epoch, and the state EMA/LLaCA keep.

Every case is set up as the continual engine (`mmcl.engine.loop._run`) does it: a `RunConfig` naming the strategies,
the built-in `image` stream and tiny model, `build_context` (`set_trainable` with the engine's default parts, a
`Context`, the run's `Strategies`), `prepare_model`; then a first task (`color_qa`: `use_task`, `on_task_start`, a few
training steps with the strategy's hooks, `on_task_end` in reverse order) so the state a strategy has in the *second*
task exists (EWC/MAS importance and anchor, LwF/MoInCL teacher, replay memory, the EMA swapped in), and `use_task` +
`on_task_start` of the second task (`shape_cls`).
The second task's steps are then timed through `fit` with the strategy's `StepHooks` (`Strategies.step_hooks`) against
the same steps (same weights, same seeded batch plan) with the hooks of the baseline composition: `[sequential]`,
or `[lora]` for `[lora, llaca]` (LLaCA runs on a LoRA adapter, so sequential LoRA is its baseline). Replay adds no
per-step work, it mixes the memory into the task's examples (`train_examples`), which adds steps per epoch; what is
timed is the time per step on the mixed examples vs the task's own.

Each pair runs back to back in alternating order, several rounds; the result is the median over rounds of the
paired ratio strategy s/step ÷ baseline s/step (both runs of a pair see the same machine load). The importance pass
(`mmcl.strategies._importance.importance_pass`, as `on_task_end` calls it) is timed the same way against one epoch
of `fit` on the same examples with the same batch size.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
import torch  # noqa: E402

STEP_GOALS = {"ema": 1.05, "llaca": 1.10, "ewc": 1.15, "mas": 1.15, "replay": 1.05, "lwf": 1.6, "moincl": 1.6}
IMPORTANCE_GOAL = 1.2
STATE_GOAL = 2.0
FIRST_TASK_STEPS = 3
BATCH_SIZE = 16

# name -> (strategies, baseline strategies)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "ema": (["ema"], ["sequential"]),
    "llaca": (["lora", "llaca"], ["lora"]),
    "ewc": (["ewc"], ["sequential"]),
    "mas": (["mas"], ["sequential"]),
    "replay": (["replay"], ["sequential"]),
    "lwf": (["lwf"], ["sequential"]),
    # shape_cls after color_qa is QA after QA, so no pseudo targets: what is timed is IKD (text_instruct_num rows
    # appended to every micro-batch and a teacher forward on them)
    "moincl": (["moincl"], ["sequential"]),
}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Case:
    """One strategy composition in its second-task state, with the baseline hooks on the same model."""

    name: str
    names: list[str]
    baseline_names: list[str]
    ctx: object = None
    strategies: list = field(default_factory=list)  # the run's `Strategies` (a sequence with the hook calls)
    hooks: object = None
    baseline_hooks: object = None
    examples: list = field(default_factory=list)  # what the strategy trains on (train_examples chain)
    task_examples: list = field(default_factory=list)  # the task's own examples (the baseline's)
    init: dict = field(default_factory=dict)
    train_examples_s: float = 0.0


def build_case(name: str, world: Path, model_path: Path, run_dir: Path) -> Case:
    import yaml

    from mmcl.config import StrategySpec, TrainConfig
    from mmcl.engine.hooks import Strategies
    from mmcl.engine.train import fit
    from mmcl.seeding import SEED_BATCH_ORDER, seed_everything, task_seed
    from mmcl.strategies import build_strategies

    names, base_names = CASES[name]
    case = Case(name, names, base_names)
    # the benchmark trains the first two tasks only; the retention tasks are MoInCL's instructions (never evaluated)
    image = yaml.safe_load((world / "streams" / "image.yaml").read_text())
    ctx, strategies, cfg = benchutil.stream_context(
        names, [world / "streams" / t for t in image["tasks"][:2]], run_dir / name, model_path,
        retention=[world / "streams" / t for t in image.get("retention", [])])
    accelerator, model = ctx.accelerator, ctx.model

    # first task: a few steps with the strategy's hooks, then its task end (importance, teacher, memory, EMA swap)
    ctx.task_index = 0
    seed_everything(task_seed(cfg.seed, 0))
    strategies.use_task(ctx.task.name)
    strategies.on_task_start(ctx)
    first = TrainConfig(epochs=1000, max_steps=FIRST_TASK_STEPS, batch_size=BATCH_SIZE, lr=1e-3)
    fit(model, strategies.train_examples(ctx, ctx.train_examples(ctx.task.name)), ctx.collator(), first, accelerator,
        seed=task_seed(cfg.seed, 0, SEED_BATCH_ORDER), hooks=strategies.step_hooks(ctx), progress=False)
    strategies.on_task_end(ctx)  # in reverse order

    # second task: its start, and what it trains on
    ctx.task_index = 1
    seed_everything(task_seed(cfg.seed, 1))
    strategies.use_task(ctx.task.name)
    strategies.on_task_start(ctx)
    case.task_examples = ctx.train_examples(ctx.task.name)
    t = time.perf_counter()
    case.examples = strategies.train_examples(ctx, case.task_examples)
    case.train_examples_s = time.perf_counter() - t

    by_name = {s.name: s for s in strategies}
    if base_names == ["sequential"]:
        baseline = Strategies(build_strategies([StrategySpec("sequential")]))
    else:  # the strategies of the composition that are the baseline (lora, already wrapping the model)
        baseline = Strategies([by_name[n] for n in base_names])
    case.ctx, case.strategies = ctx, strategies
    case.hooks, case.baseline_hooks = strategies.step_hooks(ctx), baseline.step_hooks(ctx)
    case.init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return case


def _reset(case: Case) -> None:
    model = case.ctx.model
    model.load_state_dict(case.init)
    model.zero_grad(set_to_none=True)
    gc.collect()


def timed_fit(case: Case, side: str, n_steps: int) -> tuple[float, float]:
    """(seconds per step of the training loop, CPU seconds per step of this process) for n_steps of the 2nd task.

    side: "strat" (the strategy's hooks on what it trains on), "base" (the baseline's hooks on the task's own
    examples), "control" (the baseline's hooks on the strategy's examples: replay's padding/data cost alone)."""
    from accelerate import Accelerator

    from mmcl.config import TrainConfig
    from mmcl.engine.train import fit
    from mmcl.seeding import SEED_BATCH_ORDER, task_seed

    ctx = case.ctx
    cfg = TrainConfig(epochs=1000, max_steps=n_steps, batch_size=BATCH_SIZE, lr=1e-3, warmup_ratio=0.03)
    _reset(case)
    accelerator = Accelerator(cpu=ctx.device.type == "cpu", mixed_precision="no")
    examples = case.task_examples if side == "base" else case.examples
    hooks = case.hooks if side == "strat" else case.baseline_hooks
    c = time.process_time()
    res = fit(ctx.model, examples, ctx.collator(), cfg, accelerator, seed=task_seed(ctx.seed, 1, SEED_BATCH_ORDER),
              hooks=hooks, label=f"bench {case.name}", progress=False)
    dc = time.process_time() - c
    assert res.steps == n_steps and res.skipped_steps == 0, res
    return res.train_time_s / n_steps, dc / n_steps


def timed_importance(case: Case) -> tuple[float, float]:
    """(wall s, CPU s) of the importance pass over the second task's examples, as `on_task_end` runs it."""
    from mmcl.strategies._importance import importance_pass

    s = case.strategies[0]
    ctx = case.ctx
    bs = s.config.batch_size or BATCH_SIZE
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    imp = importance_pass(ctx, case.task_examples, s.kind, bs, s.config.max_samples)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    assert imp
    return dt, dc


def timed_epoch(case: Case) -> tuple[float, float]:
    """(wall s, CPU s) of one epoch of `fit` (baseline hooks) on the second task's examples, same batch size."""
    from accelerate import Accelerator

    from mmcl.config import TrainConfig
    from mmcl.engine.train import fit
    from mmcl.seeding import SEED_BATCH_ORDER, task_seed

    ctx = case.ctx
    cfg = TrainConfig(epochs=1, batch_size=BATCH_SIZE, lr=1e-3, warmup_ratio=0.03)
    _reset(case)
    accelerator = Accelerator(cpu=ctx.device.type == "cpu", mixed_precision="no")
    t, c = time.perf_counter(), time.process_time()
    fit(ctx.model, case.task_examples, ctx.collator(), cfg, accelerator, seed=task_seed(ctx.seed, 1, SEED_BATCH_ORDER),
        hooks=case.baseline_hooks, label=f"bench {case.name} epoch", progress=False)
    return time.perf_counter() - t, time.process_time() - c


def _shapes(case: Case, n_steps: int) -> dict:
    """Padded tokens per step of the timed steps on each side (the collator pads each batch to its longest)."""
    from mmcl.config import TrainConfig
    from mmcl.engine.train import global_batches
    from mmcl.seeding import SEED_BATCH_ORDER, task_seed

    cfg = TrainConfig(epochs=1000, max_steps=n_steps, batch_size=BATCH_SIZE)
    out = {}
    for key, examples in (("task", case.task_examples), ("strategy", case.examples)):
        plan = global_batches(len(examples), cfg, task_seed(case.ctx.seed, 1, SEED_BATCH_ORDER))
        padded = [len(b) * max(len(examples[i].input_ids) for i in b) for b in plan]
        real = [sum(len(examples[i].input_ids) for i in b) for b in plan]
        out[f"{key}_padded_tokens_per_step"] = statistics.mean(padded)
        out[f"{key}_tokens_per_step"] = statistics.mean(real)
    lengths = {}
    for e in case.examples:
        lengths.setdefault(e.task, set()).add(len(e.input_ids))
    out["lengths_by_task"] = {t: [min(v), max(v)] for t, v in lengths.items()}
    return out


def state_bytes(case: Case) -> dict:
    tensors = []
    for s in case.strategies:
        t, _ = s.state_dict()
        tensors += list(t.values())
    trainable = _tensor_bytes(p for _, p in case.ctx.trainable_parameters())
    out = {"state_bytes": _tensor_bytes(tensors), "trainable_bytes": trainable,
           "trainable_parameters": sum(p.numel() for _, p in case.ctx.trainable_parameters())}
    out["ratio"] = out["state_bytes"] / trainable
    teacher = getattr(case.strategies[-1], "teacher", None)
    if teacher is not None:  # LwF, MoInCL: a full model copy held while the task trains (not checkpointed)
        out["teacher_bytes"] = _tensor_bytes([*teacher.parameters(), *teacher.buffers()])
        out["model_bytes"] = _tensor_bytes([*case.ctx.model.parameters(), *case.ctx.model.buffers()])
    return out


def run(quick: bool = False, only: list[str] | None = None) -> dict:
    from mmcl.config import TrainConfig
    from mmcl.engine.train import steps_for

    rounds, steps = (3, 5) if quick else (8, 12)
    world, model_path = benchutil.world_and_model_paths()
    names = only or list(CASES)
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-strategies-") as tmp:
        t_setup = time.perf_counter()
        cases = {n: build_case(n, world, model_path, Path(tmp)) for n in names}
        setup_s = time.perf_counter() - t_setup

        # warm-up: every batch the rounds will use goes through each side once (media cache, allocator, kernels)
        for case in cases.values():
            timed_fit(case, "base", steps)
            timed_fit(case, "strat", steps)
        imp_cases = [n for n in names if n in ("ewc", "mas")]
        for n in imp_cases:
            timed_importance(cases[n])
            timed_epoch(cases[n])

        states = {n: state_bytes(cases[n]) for n in names}  # after the warm-up's steps of the second task

        sides = {n: ["base", "strat", "control"] if len(cases[n].examples) != len(cases[n].task_examples)
                 else ["base", "strat"] for n in names}
        per = {n: {k: [] for side in sides[n] for k in (side, side + "_cpu")} for n in names}
        imp = {n: {"imp": [], "epoch": [], "imp_cpu": [], "epoch_cpu": []} for n in imp_cases}
        t_rounds = time.perf_counter()
        for r in range(rounds):
            for n in names:
                # alternate which goes first so a slow drift of the machine does not favour one side
                for side in (sides[n] if r % 2 == 0 else sides[n][::-1]):
                    wall, cpu = timed_fit(cases[n], side, steps)
                    per[n][side].append(wall)
                    per[n][side + "_cpu"].append(cpu)
            for n in imp_cases:
                for which in (("imp", "epoch") if r % 2 == 0 else ("epoch", "imp")):
                    wall, cpu = timed_importance(cases[n]) if which == "imp" else timed_epoch(cases[n])
                    imp[n][which].append(wall)
                    imp[n][which + "_cpu"].append(cpu)
        rounds_s = time.perf_counter() - t_rounds

        step_results = {}
        for n in names:
            p = per[n]
            ratios = [s / b for s, b in zip(p["strat"], p["base"])]
            cpu_ratios = [s / b for s, b in zip(p["strat_cpu"], p["base_cpu"])]
            ratio = statistics.median(ratios)
            case = cases[n]
            cfg1 = TrainConfig(epochs=1, batch_size=BATCH_SIZE)
            step_results[n] = {
                "strategies": case.names,
                "baseline": case.baseline_names,
                "baseline_s_per_step": benchutil.spread(p["base"]),
                "strategy_s_per_step": benchutil.spread(p["strat"]),
                "per_round_ratio": benchutil.spread(ratios),
                "ratio": ratio,
                "cpu_ratio": statistics.median(cpu_ratios),
                "goal": STEP_GOALS[n],
                "passed": ratio <= STEP_GOALS[n],
                "examples": len(case.examples),
                "task_examples": len(case.task_examples),
                "steps_per_epoch": steps_for(len(case.examples), cfg1),
                "task_steps_per_epoch": steps_for(len(case.task_examples), cfg1),
                "train_examples_s": case.train_examples_s,
                **_shapes(case, steps),
            }
            if "control" in p:  # replay: same hooks, the strategy's examples -> what the data itself costs per step
                control = [s / c for s, c in zip(p["strat"], p["control"])]
                data = [c / b for c, b in zip(p["control"], p["base"])]
                step_results[n] |= {
                    "control_s_per_step": benchutil.spread(p["control"]),
                    "hooks_ratio": statistics.median(control),  # strategy vs sequential on the same examples
                    "data_ratio": statistics.median(data),  # sequential on the mix vs on the task's own examples
                }
        imp_results = {}
        for n in imp_cases:
            q = imp[n]
            ratios = [a / b for a, b in zip(q["imp"], q["epoch"])]
            cpu_ratios = [a / b for a, b in zip(q["imp_cpu"], q["epoch_cpu"])]
            s = cases[n].strategies[0]
            imp_results[n] = {
                "importance_s": benchutil.spread(q["imp"]),
                "epoch_s": benchutil.spread(q["epoch"]),
                "per_round_ratio": benchutil.spread(ratios),
                "ratio": statistics.median(ratios),
                "cpu_ratio": statistics.median(cpu_ratios),
                "batch_size": s.config.batch_size or BATCH_SIZE,
                "examples": len(cases[n].task_examples),
                "goal": IMPORTANCE_GOAL,
                "passed": statistics.median(ratios) <= IMPORTANCE_GOAL,
            }
        state_results = {}
        for n, st in states.items():
            st = dict(st)
            if n in ("ema", "llaca"):
                st["goal"] = STATE_GOAL
                st["passed"] = st["ratio"] <= STATE_GOAL
            state_results[n] = st

    base_case = cases.get("ema") or next(iter(cases.values()))
    model = base_case.ctx.model
    passed = (all(v["passed"] for v in step_results.values()) and all(v["passed"] for v in imp_results.values())
              and all(v["passed"] for v in state_results.values() if "passed" in v))
    worst = max((v["ratio"] / v["goal"] for v in [*step_results.values(), *imp_results.values()]), default=0.0)
    return {
        "name": "strategies",
        "tasks": [t.name for t in base_case.ctx.stream.tasks],
        "batch_size": BATCH_SIZE,
        "rounds": rounds,
        "steps_per_round": steps,
        "first_task_steps": FIRST_TASK_STEPS,
        "device": str(base_case.ctx.device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "setup_s": setup_s,
        "rounds_s": rounds_s,
        "steps": step_results,
        "importance": imp_results,
        "state": state_results,
        "worst_ratio_to_goal": worst,
        "passed": passed,
    }


if __name__ == "__main__":
    import json

    torch.set_num_threads(1)
    quick = "--quick" in sys.argv
    only = [a for a in sys.argv[1:] if not a.startswith("--")] or None
    print(json.dumps(run(quick, only), indent=2))
