"""Single-task references: each train task of a stream fine-tuned alone from the base model (`mmcl single-task`).

A method's final score on a task means little without the score the same model reaches when it learns that task
and nothing else. Each task runs as a one-task stream through the ordinary engine, with the recipe's training
settings (epochs, batch size, learning rate, record limits: so the same number of steps as the task gets in the
stream), the stream entry's own `train`/`lr` where it sets them, and plain fine-tuning (`strategies=[sequential]`),
into `<out>/<task>/seed-<s>`. Its score after training is the task's ceiling; `mmcl compare --single-task` shows it
beside every method and each method's final score as a share of it. Complete runs are skipped, so an interrupted
reference continues where it stopped. A task that builds on an earlier one (LLaVA's stage 2 on stage 1's aligned
projectors) starts here from the base alone, so its "ceiling" can lie below what the stream reaches.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mmcl.config import ConfigError, load_config
from mmcl.report.tables import Table, fmt

SUMMARY = "single_task.json"


def run_complete(run_dir: Path) -> bool:
    """True when `run_dir` holds a run that evaluated its last task (one matrix row per task, plus row 0)."""
    matrix = run_dir / "matrix.json"
    if not matrix.exists():
        return False
    m = json.loads(matrix.read_text())
    return len(m["rows"]) == len(m["tasks"]) + 1


def stream_tasks(config_path: str | None, overrides: list[str]) -> list:
    """The train tasks (`mmcl.data.records.Task`) of the stream the recipe names, in the recipe's order."""
    from mmcl.builtin import resolve_stream

    cfg = load_config(config_path, overrides)
    return resolve_stream(cfg.data, progress=False, log=lambda *a: None).tasks


def _entry(task) -> str | dict:
    """The task's stream entry, keeping what the stream set for it (which parts learn, its learning rate), so that
    LLaVA's stage 1 alone still trains only the projectors at its own rate."""
    where = str(task.manifest.parent.resolve())
    extra = {**({"train": list(task.train_parts)} if task.train_parts else {}),
             **({"lr": task.train_lr} if task.train_lr is not None else {})}
    return {"task": where, **extra} if extra else where


def run_single_task(
    config_path: str | None,
    overrides: list[str],
    seeds: list[int],
    out: Path,
    *,
    tasks: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, dict[int, Path]]:
    """Fine-tune the base on each task alone for every seed (skipping complete runs), write `<out>/single_task.json`
    (score per task and seed) and return the run directory of every (task, seed)."""
    from mmcl.engine.loop import run

    stream = stream_tasks(config_path, overrides)
    known = [t.name for t in stream]
    unknown = [t for t in tasks or [] if t not in known]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not in the stream; its train tasks are {', '.join(known)}")
    chosen = [t for t in stream if not tasks or t.name in tasks]
    out.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, dict[int, Path]] = {}
    for task in chosen:
        task_out = out / task.name
        task_out.mkdir(exist_ok=True)
        stream_file = task_out / "stream.yaml"
        stream_file.write_text(yaml.safe_dump({"name": f"single-{task.name}", "tasks": [_entry(task)]}))
        for seed in seeds:
            run_dir = dirs.setdefault(task.name, {})[seed] = task_out / f"seed-{seed}"
            if run_complete(run_dir):
                log(f"[single_task {task.name} seed-{seed}] complete, skipped")
                continue
            # after the user's overrides: one task, plain fine-tuning, no retention tasks, no task order
            cfg = load_config(config_path, [*overrides, f"data.stream={stream_file}", "data.order=null",
                                            "strategies=[sequential]", "eval.retention=false", f"seed={seed}",
                                            f"output_dir={run_dir}", f"name=single_task-{task.name}-seed-{seed}"])
            log(f"[single_task {task.name} seed-{seed}] running")
            run(cfg, resume=(run_dir / "config.yaml").exists(), progress=progress, log=log)
    summary = {name: {str(s): json.loads((d / "matrix.json").read_text())["rows"][-1]["scores"][name]
                      for s, d in by_seed.items()} for name, by_seed in dirs.items()}
    (out / SUMMARY).write_text(json.dumps({"seeds": seeds, "scores": summary}, indent=2) + "\n")
    return dirs


def summary_table(out: Path) -> Table:
    """Task x seed scores of a single-task directory, with their mean."""
    data = json.loads((out / SUMMARY).read_text())
    seeds = [str(s) for s in data["seeds"]]
    rows = [[task, *(fmt(by_seed.get(s), 1) for s in seeds),
             fmt(sum(by_seed.values()) / len(by_seed), 1)] for task, by_seed in data["scores"].items()]
    return Table(["task", *(f"seed {s}" for s in seeds), "mean"], rows)
