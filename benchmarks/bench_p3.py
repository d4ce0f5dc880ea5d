"""P3's strategies (He et al. 2023): what TIR and EProj cost on top of what they build on.

1. TIR's per-step penalty vs EWC's (and TIR-MAS vs MAS). Each is set up as the continual engine does it
   (`RunConfig` -> `build_context` -> `prepare_model`), trains a first task (`color_qa`) and runs its `on_task_end`
   (importance pass, anchor), then `on_task_start` of the second (`shape_cls`): TIR embeds the task and re-weights the
   stored importance there. The baseline is a plain `ewc` (`mas`) strategy loaded with TIR's importance state (Ω,
   Id map, θ*) and started on the same task, so both penalise the same parameters with the same values: the
   per-step losses of the two sides must agree. The second task's steps are timed through `fit` with each side's
   `StepHooks`, from the same weights and the same seeded plan of batches, in paired rounds
   (`benchutil.paired_rounds`: order flipping every round, until the 95% interval of the paired ratio is narrow
   enough or a round cap / time budget is reached). The one-off cost of TIR's task start (task embedding,
   re-weighting, task_similarity.json, anchor) is timed against EWC's task start (the anchor alone).
2. EProj's routing at evaluation. A 3-task stream (`color_qa`, `shape_cls`, `count`) is trained a few steps per
   task through EProj's hooks, so three slots are in use and the projector routes (`active` None). Evaluation
   (`Context.score` on each task's test split: batched greedy generation, the run's eval batch size) of that model
   is timed against the same model whose projector is, for each task, the plain module of that task's own expert
   (the same weights the router should pick, called without routing). Paired rounds, alternating.
3. The task-encoder pass: `TaskEncoder.embed_task` (P3's 1,000 samples, the default options) on a task with 1,000
   training records vs one epoch of `fit` (forward, backward, optimizer step; sequential hooks, the engine's default
   batch size) over the same 1,000 records from the same weights. The built-in world has 192 train records per
   task, so a world with 1,000 is written (`write_world`) into a temporary directory first. Paired, alternating.

Every goal is a ratio of two timings taken back to back in the same process.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
import torch  # noqa: E402

TIR_GOAL = 1.02  # TIR s/step ÷ EWC (MAS) s/step
EPROJ_GOAL = 1.10  # routed eval s ÷ plain-projector eval s
ENCODER_GOAL = 1.0  # embed_task s ÷ one-epoch s
BATCH_SIZE = 16  # the engine's default global batch (TrainConfig.batch_size)
FIRST_TASK_STEPS = 3
EPROJ_TASKS = 3
EPROJ_TASK_STEPS = 5
ENCODER_TASK = "color_qa"
ENCODER_SAMPLES = 1000

FULL = {"tir_steps": 15, "tir_min_rounds": 10, "tir_max_rounds": 80, "tir_budget_s": 70.0, "tir_half_width": 0.015,
        "start_rounds": 6, "eproj_reps": 2, "eproj_min_rounds": 10, "eproj_max_rounds": 60, "eproj_budget_s": 40.0,
        "eproj_half_width": 0.02, "enc_min_rounds": 4, "enc_max_rounds": 12, "enc_budget_s": 60.0,
        "enc_half_width": 0.03}
QUICK = {"tir_steps": 5, "tir_min_rounds": 2, "tir_max_rounds": 2, "tir_budget_s": 5.0, "tir_half_width": 0.015,
         "start_rounds": 2, "eproj_reps": 1, "eproj_min_rounds": 2, "eproj_max_rounds": 2, "eproj_budget_s": 5.0,
         "eproj_half_width": 0.02, "enc_min_rounds": 2, "enc_max_rounds": 2, "enc_budget_s": 5.0,
         "enc_half_width": 0.03}


# -- shared set-up --------------------------------------------------------------------------------------------------




def _start_task(ctx, strategies, index: int) -> float:
    """The engine's task start (seed, `use_task`, `on_task_start`); returns its seconds."""
    from mmcl.seeding import seed_everything, task_seed

    ctx.task_index = index
    seed_everything(task_seed(ctx.seed, index))
    strategies.use_task(ctx.task.name)
    t = time.perf_counter()
    strategies.on_task_start(ctx)
    return time.perf_counter() - t


def _train_task(ctx, strategies, index: int, steps: int) -> None:
    """`steps` steps of task `index` with the strategies' hooks, then its `on_task_end` (the task was started)."""
    from mmcl.config import TrainConfig
    from mmcl.engine.train import fit
    from mmcl.seeding import SEED_BATCH_ORDER, task_seed

    cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=BATCH_SIZE, lr=1e-3)
    fit(ctx.model, strategies.train_examples(ctx, ctx.train_examples(ctx.task.name)), ctx.collator(), cfg,
        ctx.accelerator, seed=task_seed(ctx.seed, index, SEED_BATCH_ORDER), hooks=strategies.step_hooks(ctx),
        progress=False)
    strategies.on_task_end(ctx)


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reset(model, init: dict) -> None:
    model.load_state_dict(init)
    model.zero_grad(set_to_none=True)
    gc.collect()


def _timed_fit(ctx, init: dict, examples, hooks, cfg, index: int) -> tuple[benchutil.Timed, float, float]:
    """(Timed of the training loop, wall s of the whole call, CPU s of the whole call) of `fit` from `init`."""
    from accelerate import Accelerator

    from mmcl.engine.train import fit
    from mmcl.seeding import SEED_BATCH_ORDER, task_seed

    _reset(ctx.model, init)
    accelerator = Accelerator(cpu=ctx.device.type == "cpu", mixed_precision="no")
    stamps: list[float] = []
    t, c = time.perf_counter(), time.process_time()
    res = fit(ctx.model, examples, ctx.collator(), cfg, accelerator, seed=task_seed(ctx.seed, index, SEED_BATCH_ORDER),
              hooks=hooks, label="bench p3", progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    dt, dc = time.perf_counter() - t, time.process_time() - c
    assert res.skipped_steps == 0, res
    return benchutil.Timed(res.steps / res.train_time_s, res.steps / dc, res.losses, stamps), dt, dc


def paired_seconds(run_a, run_b, *, min_rounds: int, max_rounds: int, budget_s: float, half_width: float) -> dict:
    """Paired rounds of two timed calls (each returns (wall s, CPU s)), back to back, the order flipping every
    round, until the 95% interval of the paired ratio b/a (seconds) is within ±`half_width` (checked after even
    rounds, at least `min_rounds`), or `max_rounds` rounds or `budget_s` seconds are spent."""
    a, b, ac, bc = [], [], [], []
    start = time.perf_counter()
    converged = False
    while True:
        r = len(a)
        for which in (("a", "b") if r % 2 == 0 else ("b", "a")):
            wall, cpu = run_a() if which == "a" else run_b()
            (a if which == "a" else b).append(wall)
            (ac if which == "a" else bc).append(cpu)
        n = r + 1
        if n < max(min_rounds, 2) or n % 2:
            continue
        ci = benchutil.ratio_interval([y / x for x, y in zip(a, b)])
        if ci["rel_half_width"] < half_width:
            converged = True
            break
        if n >= max_rounds or time.perf_counter() - start > budget_s:
            break
    ratios = [y / x for x, y in zip(a, b)]
    ci = benchutil.ratio_interval(ratios)
    return {
        "rounds": len(ratios),
        "a_s": benchutil.spread(a),
        "b_s": benchutil.spread(b),
        "per_round_ratio": benchutil.spread(ratios),
        "interval": ci,
        "cpu_interval": benchutil.ratio_interval([y / x for x, y in zip(ac, bc)]),
        "converged": converged,
        "rounds_needed": benchutil.rounds_needed(ci["log_sd"], half_width),
        "target_half_width": half_width,
        "max_rounds": max_rounds,
        "budget_s": budget_s,
        "seconds": time.perf_counter() - start,
    }


# -- 1. TIR vs EWC / MAS ----------------------------------------------------------------------------------------------


def bench_tir(kind: str, world: Path, model_path: Path, run_dir: Path, mode: dict) -> dict:
    from mmcl.config import StrategySpec, TrainConfig
    from mmcl.engine.hooks import Strategies
    from mmcl.strategies import build_strategies
    from mmcl.strategies.tir import reweight

    image = _image_tasks(world)
    t_setup = time.perf_counter()
    ctx, strategies, _ = benchutil.stream_context([f"tir_{kind}"], image[:2], run_dir, model_path)
    first_start_s = _start_task(ctx, strategies, 0)  # task 1: embedding only (nothing stored to re-weight yet)
    _train_task(ctx, strategies, 0, FIRST_TASK_STEPS)
    tir = strategies[0]
    pre = ({k: v.clone() for k, v in tir.omega.items()}, list(tir.log))  # the state before the 2nd task's start
    start_s = _start_task(ctx, strategies, 1)  # task 2: embedding + re-weighting + anchor
    assert tir.log and tir._anchor is not None, "TIR did not re-weight at the second task's start"

    # the baseline: plain EWC/MAS holding TIR's importance state (same Ω, Id map, θ*), started on the same task
    base = Strategies(build_strategies([StrategySpec(kind)]))
    tensors, meta = tir.state_dict()
    base[0].load_state_dict({k: v for k, v in tensors.items() if not k.startswith("emb/")}, meta)
    base.use_task(ctx.task.name)
    base.on_task_start(ctx)
    hooks_tir, hooks_base = strategies.step_hooks(ctx), base.step_hooks(ctx)
    examples = ctx.train_examples(ctx.task.name)
    init = _snapshot(ctx.model)
    setup_s = time.perf_counter() - t_setup

    steps = mode["tir_steps"]
    cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=BATCH_SIZE, lr=1e-3, warmup_ratio=0.03)

    def run_base(n):
        return _timed_fit(ctx, init, examples, hooks_base, cfg, 1)[0]

    def run_tir(n):
        return _timed_fit(ctx, init, examples, hooks_tir, cfg, 1)[0]

    run_base(steps), run_tir(steps)  # warm-up: every batch decoded and cached, allocator and kernels warm
    # a = the baseline, b = TIR: ratio of steps/s a/b = TIR s/step ÷ baseline s/step
    r = benchutil.paired_rounds(run_base, run_tir, steps=steps, min_rounds=mode["tir_min_rounds"],
                                max_rounds=mode["tir_max_rounds"], budget_s=mode["tir_budget_s"],
                                half_width=mode["tir_half_width"])

    # the one-off cost of a task start: TIR's (embedding, re-weighting, JSON, anchor) vs the baseline's (anchor)
    saved = ({k: v.clone() for k, v in tir.omega.items()}, list(tir.log), {i: dict(e) for i, e in
             tir.embeddings.items()}, dict(tir.names))
    earlier = sorted(i for i in tir.embeddings if i < 1)
    sims = dict(zip(earlier, [tir.log[-1]["similarity"][tir.names[i]] for i in earlier]))

    def restore():
        tir.omega = {k: v.clone() for k, v in pre[0].items()}
        tir.log = list(pre[1])

    def tir_start():
        restore()
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        tir.on_task_start(ctx)
        return time.perf_counter() - t, time.process_time() - c

    def base_start():
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        base.on_task_start(ctx)
        return time.perf_counter() - t, time.process_time() - c

    tir_start(), base_start()
    starts = paired_seconds(base_start, tir_start, min_rounds=mode["start_rounds"], max_rounds=mode["start_rounds"],
                            budget_s=0.0, half_width=0.0)
    parts = {"embed_task": [], "reweight": [], "write_json": []}
    for _ in range(mode["start_rounds"]):
        t = time.perf_counter()
        tir._encoder.embed_task(ctx, ctx.task.name)
        parts["embed_task"].append(time.perf_counter() - t)
        t = time.perf_counter()
        reweight(pre[0], tir.ids, sims)
        parts["reweight"].append(time.perf_counter() - t)
        t = time.perf_counter()
        tir._write(ctx)
        parts["write_json"].append(time.perf_counter() - t)
    tir.omega, tir.log, tir.embeddings, tir.names = saved  # leave the strategy as the real task start left it
    base_s_per_step = 1 / r["a_steps_per_s"]["median"]
    extra_s = statistics.median(starts["b_s"]["values"]) - statistics.median(starts["a_s"]["values"])
    out = {
        "strategy": f"tir_{kind}",
        "baseline": kind,
        "first_task": ctx.stream.tasks[0].name,
        "task": ctx.task.name,
        "examples": len(examples),
        "parameters": sum(p.numel() for p in ctx.model.parameters()),
        "trainable_parameters": sum(p.numel() for _, p in ctx.trainable_parameters()),
        "regularized_elements": sum(v.numel() for v in tir.omega.values()),
        "similarity": {tir.names[i]: s for i, s in sims.items()},
        "text_source": tir._encoder.text_source,
        "encoder_samples": min(len(ctx.records[ctx.task.name]["train"]), tir.config.similarity.max_samples),
        "setup_s": setup_s,
        "first_start_s": first_start_s,
        "start_s_in_setup": start_s,
        "steps": r,
        "ratio": r["interval"]["ratio"],
        "goal": TIR_GOAL,
        "passed": r["interval"]["ratio"] <= TIR_GOAL,
        "start": {
            **starts,
            "parts_s": {k: benchutil.spread(v) for k, v in parts.items()},
            "extra_s": extra_s,
            "extra_steps": extra_s / base_s_per_step,
            "epoch_steps": -(-len(examples) // BATCH_SIZE),
        },
    }
    return out


def _image_tasks(world: Path) -> list[Path]:
    import yaml

    image = yaml.safe_load((world / "streams" / "image.yaml").read_text())
    return [(world / "streams" / t).resolve() for t in image["tasks"]]


# -- 2. EProj's routing at evaluation ---------------------------------------------------------------------------------


def bench_eproj(world: Path, model_path: Path, run_dir: Path, mode: dict) -> dict:
    from mmcl.models.experts import ExpertProjector

    t_setup = time.perf_counter()
    ctx, strategies, cfg = benchutil.stream_context(["eproj"], _image_tasks(world)[:EPROJ_TASKS], run_dir, model_path)
    eproj = strategies[0]
    for i in range(EPROJ_TASKS):
        _start_task(ctx, strategies, i)
        _train_task(ctx, strategies, i, EPROJ_TASK_STEPS)
    model = ctx.model
    proj = model.projectors["image"]
    assert isinstance(proj, ExpertProjector) and proj.active is None and len(proj.slots_in_use) >= 2, proj
    tasks = list(ctx.stream.tasks)
    plain = {t.name: proj.experts[eproj.slot_expert[i]] for i, t in enumerate(tasks)}
    setup_s = time.perf_counter() - t_setup
    reps = mode["eproj_reps"]
    seen: dict[str, dict] = {}

    def evaluate(routed: bool):
        """Every task's test split once per rep; (wall s, CPU s)."""
        wall = cpu = 0.0
        for _ in range(reps):
            for task in tasks:
                model.projectors["image"] = proj if routed else plain[task.name]
                gc.collect()
                t, c = time.perf_counter(), time.process_time()
                res = ctx.score(task, "test")
                wall += time.perf_counter() - t
                cpu += time.process_time() - c
                key = "routed" if routed else "plain"
                d = seen.setdefault(task.name, {})
                d[key] = [p["prediction"] for p in res.predictions]
                d[key + "_score"] = res.score
                if routed:
                    d["routes"] = proj.last_route.tolist()
        model.projectors["image"] = proj
        return wall, cpu

    evaluate(False), evaluate(True)  # warm-up (media decoded and cached)
    r = paired_seconds(lambda: evaluate(False), lambda: evaluate(True), min_rounds=mode["eproj_min_rounds"],
                       max_rounds=mode["eproj_max_rounds"], budget_s=mode["eproj_budget_s"],
                       half_width=mode["eproj_half_width"])
    per_task = {}
    for i, task in enumerate(tasks):
        d = seen[task.name]
        own = eproj.slot_expert[i]
        routes = [eproj.slot_expert[s] for s in d["routes"]]
        per_task[task.name] = {
            "records": len(d["routed"]),
            "max_new_tokens": task.max_new_tokens,
            "expert": own,
            "routed_to_own": sum(e == own for e in routes),
            "experts_used": sorted(set(routes)),
            "differing_answers": sum(x != y for x, y in zip(d["routed"], d["plain"])),
            "routed_score": d["routed_score"],
            "plain_score": d["plain_score"],
        }
    out = {
        "tasks": [t.name for t in tasks],
        "slots_in_use": list(proj.slots_in_use),
        "slot_expert": list(eproj.slot_expert),
        "key_steps": eproj.config.key_steps,
        "task_steps": EPROJ_TASK_STEPS,
        "eval_batch_size": cfg.eval.batch_size,
        "reps": reps,
        "setup_s": setup_s,
        "per_task": per_task,
        "eval": r,
        "ratio": r["interval"]["ratio"],
        "goal": EPROJ_GOAL,
        "passed": r["interval"]["ratio"] <= EPROJ_GOAL,
    }
    return out


# -- 3. the task-encoder pass vs one training epoch ------------------------------------------------------------------


def bench_encoder(model_path: Path, tmp: Path, mode: dict, samples: int = ENCODER_SAMPLES) -> dict:
    from mmcl.config import TrainConfig
    from mmcl.data.synth import WorldSizes, write_world
    from mmcl.strategies.similarity import TaskEncoder, TaskEncoderOptions

    t = time.perf_counter()
    sizes = WorldSizes(train=samples, test=8, lang_train=8, align=8, image_size=32)
    world = tmp / "world-1k"
    write_world(world, seed=0, sizes=sizes)
    world_s = time.perf_counter() - t

    t_setup = time.perf_counter()
    ctx, strategies, _ = benchutil.stream_context(["sequential"], [world / "tasks" / ENCODER_TASK], tmp / "encoder",
                                         model_path)
    ctx.task_index = 0
    strategies.use_task(ctx.task.name)
    strategies.on_task_start(ctx)
    examples = ctx.train_examples(ctx.task.name)
    assert len(examples) == samples, len(examples)
    hooks = strategies.step_hooks(ctx)
    init = _snapshot(ctx.model)
    options = TaskEncoderOptions()
    encoder = TaskEncoder(options)
    assert options.max_samples >= samples
    epoch_cfg = TrainConfig(epochs=1, batch_size=BATCH_SIZE, lr=1e-3, warmup_ratio=0.03)
    setup_s = time.perf_counter() - t_setup
    emb_holder: dict = {}

    def epoch():
        timed, wall, cpu = _timed_fit(ctx, init, examples, hooks, epoch_cfg, 0)
        emb_holder["steps"] = len(timed.losses)
        return wall, cpu

    def embed():
        _reset(ctx.model, init)
        t, c = time.perf_counter(), time.process_time()
        emb_holder["emb"] = encoder.embed_task(ctx, ctx.task.name)
        return time.perf_counter() - t, time.process_time() - c

    warm = {"epoch_s": epoch()[0], "embed_s": embed()[0]}  # warm-up: the 1,000 images decoded into the cache
    r = paired_seconds(epoch, embed, min_rounds=mode["enc_min_rounds"], max_rounds=mode["enc_max_rounds"],
                       budget_s=mode["enc_budget_s"], half_width=mode["enc_half_width"])
    out = {
        "task": ENCODER_TASK,
        "samples": samples,
        "world_sizes": {"train": sizes.train, "test": sizes.test, "lang_train": sizes.lang_train,
                        "align": sizes.align, "image_size": sizes.image_size},
        "world_s": world_s,
        "setup_s": setup_s,
        "warm_s": warm,
        "epoch_steps": emb_holder["steps"],
        "batch_size": BATCH_SIZE,
        "encoder_batch_size": options.batch_size,
        "encoder_max_samples": options.max_samples,
        "text_source": encoder.text_source,
        "kinds": sorted(emb_holder["emb"]),
        "pass": r,
        "ratio": r["interval"]["ratio"],
        "goal": ENCODER_GOAL,
        "passed": r["interval"]["ratio"] <= ENCODER_GOAL,
    }
    return out


def run(quick: bool = False) -> dict:
    mode = QUICK if quick else FULL
    benchutil.quiet_hf()
    world, model_path = benchutil.world_and_model_paths()
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-p3-") as tmp:
        tmp = Path(tmp)
        tir = {k: bench_tir(k, world, model_path, tmp / f"tir_{k}", mode) for k in ("ewc", "mas")}
        eproj = bench_eproj(world, model_path, tmp / "eproj", mode)
        encoder = bench_encoder(model_path, tmp, mode)
    return {
        "name": "p3",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "parameters": tir["ewc"]["parameters"],
        "batch_size": BATCH_SIZE,
        "first_task_steps": FIRST_TASK_STEPS,
        "mode": mode,
        "tir": tir,
        "eproj": eproj,
        "encoder": encoder,
        "passed": all(v["passed"] for v in tir.values()) and eproj["passed"] and encoder["passed"],
    }


if __name__ == "__main__":
    import json

    torch.set_num_threads(1)
    print(json.dumps(run("--quick" in sys.argv), indent=2, default=str))
