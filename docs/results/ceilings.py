"""Single-task ceilings of the built-in world: each stream task fine-tuned alone from the tiny base model, with the
same recipe (epochs, batch, lr) as in its stream, scored on its whole test set; writes docs/results/ceilings.json.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/ceilings.py --seeds 0 [--tasks count,ocr]

The world and the base model are the built-in ones under $MMCL_HOME (made on first use, as `mmcl demo` does).
Image stream tasks use configs/image/base.yaml's recipe, the MICL tasks configs/micl/base.yaml's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"image": ROOT / "configs/image/base.yaml", "micl1": ROOT / "configs/micl/base.yaml"}


def stream_tasks(world: Path) -> dict[str, tuple[str, Path]]:
    """Task name -> (stream it belongs to, task directory), image stream first, then the MICL tasks."""
    out: dict[str, tuple[str, Path]] = {}
    for stream in RECIPES:
        f = world / "streams" / f"{stream}.yaml"
        for t in yaml.safe_load(f.read_text())["tasks"]:
            path = (f.parent / t).resolve()
            out.setdefault(path.name, (stream, path))
    return out


def ceiling(task: str, stream: str, task_dir: Path, seed: int, work: Path, overrides: list[str]) -> dict:
    """Fine-tune the base on `task` alone and return its score and wall time."""
    from mmcl.config import load_config
    from mmcl.engine.loop import run

    stream_file = work / f"{task}-{seed}.yaml"
    stream_file.write_text(yaml.safe_dump({"name": f"single-{task}", "tasks": [str(task_dir)]}))
    cfg = load_config(RECIPES[stream], [f"name={task}-{seed}", f"output_dir={work / f'{task}-{seed}'}",
                                        f"seed={seed}", f"data.stream={stream_file}", "eval.retention=false",
                                        *overrides])
    t0 = time.perf_counter()
    run_dir = run(cfg, progress=False, log=lambda *a: None)
    matrix = json.loads((run_dir / "matrix.json").read_text())
    n_test = sum(1 for _ in open(task_dir / "test.jsonl"))
    return {"score": matrix["rows"][-1]["scores"][task], "n_test": n_test, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (default 0)")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: every stream task)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/ceilings.json"))
    ap.add_argument("--world", default="", help="a world directory (default: the built-in one under $MMCL_HOME)")
    ap.add_argument("--model", default="", help="a base model directory (default: the built-in tiny one)")
    ap.add_argument("--keep", default="", help="keep the run directories under this folder (default: discarded)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. train.epochs=4")
    args = ap.parse_args(argv)
    from mmcl.builtin import builtin_model, builtin_world

    world = Path(args.world) if args.world else builtin_world(progress=False)
    base = Path(args.model) if args.model else builtin_model(progress=False)
    if args.model:
        args.overrides = [f"model.path={base}", *args.overrides]
    tasks = stream_tasks(world)
    chosen = [t for t in args.tasks.split(",") if t] or list(tasks)
    unknown = [t for t in chosen if t not in tasks]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)}; known: {', '.join(tasks)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for task in chosen:
            stream, task_dir = tasks[task]
            runs = [ceiling(task, stream, task_dir, s, Path(tmp), args.overrides) for s in seeds]
            scores = [r["score"] for r in runs]
            results[task] = {"stream": stream, "scores": scores, "mean": round(sum(scores) / len(scores), 2),
                             "n_test": runs[0]["n_test"], "wall_s": [r["wall_s"] for r in runs]}
            print(f"{task:10s} {results[task]['mean']:7.2f}  {scores}  n_test={runs[0]['n_test']} "
                  f"({sum(r['wall_s'] for r in runs):.0f} s)", flush=True)
    pre = json.loads((base / "pretrain.json").read_text())
    doc = {"world": json.loads((world / "world.json").read_text())["sizes"], "seeds": seeds,
           "overrides": args.overrides, "base_scores": pre.get("scores"), "base_time_s": pre.get("time_s"),
           "tasks": results}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
