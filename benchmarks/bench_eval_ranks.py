"""Sharded evaluation: does evaluation time fall with the ranks? The same tasks' test records are scored by
`Context.score` (each rank generates its share, every rank gets all answers) in 1 process and in 2 gloo processes,
both started by Accelerate's launcher with configs/accelerate/ddp.yaml (`--num_processes 1` / `2`).

Each launch builds the run's context as a run does (`benchutil.stream_context`), warms up once, then times `reps`
evaluations of every task between two barriers (rank 0's clock). Rounds launch both sides back to back, the order
flipping every round; the result is the paired ratio (2-process seconds ÷ 1-process seconds) with its 95% interval,
and whether both gave the same scores and predictions. Process start-up is not timed (it does not grow with the records).

    .venv/bin/python benchmarks/bench_eval_ranks.py [--quick]      # prints the JSON result
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import benchutil  # noqa: E402

TASKS = ["color_qa", "shape_cls", "count", "ocr", "grounding", "caption"]
QUICK_TASKS = ["color_qa", "count"]
GOAL = 1.0
"""Reported against: 2-process evaluation time ÷ 1-process time below 1 (time falls with the ranks)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, tasks: list[str], reps: int, scratch: Path) -> dict:
    out = scratch / f"result-{processes}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--tasks", ",".join(tasks), "--reps", str(reps), "--scratch", str(scratch)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process evaluation failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _worker(out: Path, tasks: list[str], reps: int, scratch: Path) -> None:
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    world, model_path = benchutil.world_and_model_paths()
    ctx, _, _ = benchutil.stream_context(["sequential"], [world / "tasks" / t for t in tasks],
                                         scratch / f"ctx-{os.getppid()}-rank{rank}", model_path)
    acc = ctx.accelerator
    seconds, cpu_seconds, results = [], [], {}
    for rep in range(reps + 1):  # the first pass warms up (decodes every image into the loader's cache)
        acc.wait_for_everyone()
        t, c = time.perf_counter(), time.process_time()
        results = {task.name: ctx.score(task, "test") for task in ctx.stream.tasks}
        acc.wait_for_everyone()
        if rep:
            seconds.append(time.perf_counter() - t)
            cpu_seconds.append(time.process_time() - c)
    if acc.is_main_process:
        records = {task.name: len(ctx.records[task.name]["test"]) for task in ctx.stream.tasks}
        out.write_text(json.dumps({"processes": acc.num_processes, "seconds": seconds, "cpu_seconds_rank0": cpu_seconds,
                                   "scores": {k: v.score for k, v in results.items()},
                                   "predictions": {k: v.predictions for k, v in results.items()},
                                   "records": records, "eval_batch_size": ctx.config.eval.batch_size}))


def run(quick: bool = False) -> dict:
    tasks = QUICK_TASKS if quick else TASKS
    rounds, reps = (2, 2) if quick else (6, 4)
    benchutil.world_and_model_paths()  # built once here, not inside the launched processes
    load_before = os.getloadavg()[0]
    one, two, ratios, same = [], [], [], True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-ranks-") as tmp:
        scratch = Path(tmp)
        for r in range(rounds):
            sides = (1, 2) if r % 2 == 0 else (2, 1)
            got = {n: _launch(n, tasks, reps, scratch) for n in sides}
            if got[2]["processes"] != 2 or got[1]["processes"] != 1:
                raise RuntimeError(f"launched {got[1]['processes']} and {got[2]['processes']} processes, not 1 and 2")
            one.append(statistics.median(got[1]["seconds"]))
            two.append(statistics.median(got[2]["seconds"]))
            ratios.append(two[-1] / one[-1])
            same = same and (got[1]["scores"], got[1]["predictions"]) == (got[2]["scores"], got[2]["predictions"])
    interval = benchutil.ratio_interval(ratios) if len(ratios) > 1 else None
    return {
        "tasks": tasks, "records": got[1]["records"], "eval_batch_size": got[1]["eval_batch_size"],
        "rounds": rounds, "reps": reps, "one_s": benchutil.spread(one), "two_s": benchutil.spread(two),
        "per_round_ratio": benchutil.spread(ratios), "interval": interval, "same_scores": same,
        "scores": got[1]["scores"], "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "load_before": load_before, "load_after": os.getloadavg()[0], "seconds": time.perf_counter() - start,
        "goal": GOAL, "passed": bool(interval and interval["high"] < GOAL and same),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tasks", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.out, args.tasks.split(","), args.reps, args.scratch)
        return 0
    print(json.dumps(run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
