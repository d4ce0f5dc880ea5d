"""Evaluation: batched greedy generation against one-sample-at-a-time generation, same function, same records.

`mmcl.eval.generate.generate_answers` runs every task's test records with batch 64 (left padding, KV cache, prompts
grouped by length) and with batch 1; the speed-up is the ratio of samples/s (medians over alternating rounds). The
answers of both must be the same greedy decodes: mismatches are counted and reported (a few can come from float
summation-order differences between padded and unpadded batches; they are shown, not hidden).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
import torch  # noqa: E402

GOAL = 5.0
BATCH = 64
TASKS = ["color_qa", "shape_cls", "count", "ocr", "mcq", "grounding", "caption", "lang_arith"]
QUICK_TASKS = ["color_qa", "count", "grounding", "lang_arith"]


def run(quick: bool = False) -> dict:
    from mmcl.data.batching import Collator
    from mmcl.eval.generate import generate_answers

    tasks = QUICK_TASKS if quick else TASKS
    rounds = 2 if quick else 3
    world, model_path = benchutil.world_and_model_paths()
    model, processor, media = benchutil.load(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    dtype = next(model.parameters()).dtype
    collator = Collator(processor, media, left_pad=True)
    sets = []
    for name in tasks:
        task, recs = benchutil.records(world, name, "test")
        sets.append((task, recs))
    n = sum(len(r) for _, r in sets)

    def answer(task, recs, batch_size: int) -> tuple[float, float, list[str]]:
        t, c = time.perf_counter(), time.process_time()
        out = generate_answers(model, processor, collator, recs, task.name, task.max_new_tokens, batch_size, device,
                               dtype)
        return time.perf_counter() - t, time.process_time() - c, out

    # warm-up: decode every image once (the media cache is shared by both), warm the generation code paths
    for task, recs in sets:
        answer(task, recs, BATCH)
    answer(sets[0][0], sets[0][1][:4], 1)

    # Rounds over all tasks; within a round each task runs batched and single back to back (order flipping), so the
    # two sides of the comparison see the same machine load as closely as possible.
    wall = {"batched": [], "single": []}
    cpu = {"batched": [], "single": []}
    answers = {"batched": {}, "single": {}}
    task_wall = {t.name: {"batched": 0.0, "single": 0.0} for t, _ in sets}
    for r in range(rounds):
        gc.collect()
        w_sum = {"batched": 0.0, "single": 0.0}
        c_sum = {"batched": 0.0, "single": 0.0}
        for k, (task, recs) in enumerate(sets):
            for which in (("batched", "single") if (r + k) % 2 == 0 else ("single", "batched")):
                w, c, a = answer(task, recs, BATCH if which == "batched" else 1)
                w_sum[which] += w
                task_wall[task.name][which] += w
                c_sum[which] += c
                answers[which][task.name] = a
        for which in wall:
            wall[which].append(n / w_sum[which])
            cpu[which].append(n / c_sum[which])

    per_task = {}
    mismatches = []
    for task, recs in sets:
        b, s = answers["batched"][task.name], answers["single"][task.name]
        bad = [(rec.id, x, y) for rec, x, y in zip(recs, b, s) if x != y]
        per_task[task.name] = {"records": len(recs), "max_new_tokens": task.max_new_tokens, "mismatches": len(bad),
                           "speedup": task_wall[task.name]["single"] / task_wall[task.name]["batched"]}
        mismatches += [{"task": task.name, "id": i, "batched": x, "single": y} for i, x, y in bad]

    batched, single = benchutil.spread(wall["batched"]), benchutil.spread(wall["single"])
    speedup = batched["median"] / single["median"]
    cpu_speedup = benchutil.spread(cpu["batched"])["median"] / benchutil.spread(cpu["single"])["median"]
    return {
        "name": "eval",
        "tasks": per_task,
        "records": n,
        "batch_size": BATCH,
        "rounds": rounds,
        "device": str(device),
        "batched_samples_per_s": batched,
        "single_samples_per_s": single,
        "speedup": speedup,
        "cpu_time_speedup": cpu_speedup,
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:10],
        "goal": GOAL,
        "passed": speedup >= GOAL,
    }


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    print(json.dumps(run(quick), indent=2))
