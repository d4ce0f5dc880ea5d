"""Streams: an ordered list of train tasks plus evaluate-only retention tasks (task directories, the language probes
shipped with mmcl as `probe:NAME`, or lm-evaluation-harness tasks as `lm_eval:TASKS`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mmcl.data.records import (
    LM_EVAL_SCORER,
    MODEL_PARTS,
    PROBES_DIR,
    DataError,
    Problem,
    Stream,
    Task,
    _read_yaml,
    load_task,
    read_records,
    records_file_task,
)


def retention_tasks(entry, stream_path: Path) -> list[Task]:
    """The tasks of one retention entry of a stream: a task directory (relative to the stream file), `probe:NAME`
    or `probe:NAME:N` (a language probe shipped with mmcl, nlu or nlg, or its first N records) or `lm_eval:TASKS` (comma-separated lm-evaluation-harness tasks:
    registered names, or YAML task files relative to the stream file; one column each)."""
    kind, _, rest = str(entry).partition(":")
    if kind == "probe":
        known = sorted(p.parent.name for p in PROBES_DIR.glob("*/task.yaml"))
        name, _, size = rest.partition(":")
        if name not in known or (size and not (size.isdigit() and int(size) > 0)):
            raise DataError(f"{stream_path}: retention entry {entry!r}: write probe:NAME or probe:NAME:N (its first N "
                            "records), NAME one of " + (", ".join(known) or "none (is the package complete?)"))
        task = load_task(PROBES_DIR / name)
        if size:
            task.name, task.limit = f"{task.name}-{size}", int(size)
        return [task]
    if kind != "lm_eval":
        return [load_task(stream_path.parent / str(entry))]
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:  # refused now, not at the first evaluation after the model is loaded
        raise DataError(f"{stream_path}: retention entry {entry!r} needs lm-evaluation-harness, which is not "
                        "installed; install it with pip install 'mmcl[lmeval]' (lm-eval==0.4.13)")
    tasks = []
    for name in filter(None, (n.strip() for n in rest.split(","))):
        spec, manifest = name, stream_path
        if name.endswith((".yaml", ".yml")):  # a local task file: its `task:` key names the column
            spec = str(manifest := (stream_path.parent / name).resolve())
            # read as text: lm-eval's task files may hold tags (!function) that plain YAML refuses
            text = manifest.read_text() if manifest.is_file() else ""
            found = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", text, re.M)
            name = found.group(1) if found else None
            if not name:
                raise DataError(f"{stream_path}: lm_eval task file {manifest} is missing or has no 'task:' name")
        tasks.append(Task(f"lm_eval-{name}", "text", "lm_eval", LM_EVAL_SCORER, {}, stream_path.parent, manifest,
                          f"lm-evaluation-harness task {name}", lm_eval_task=spec))
    if not tasks:
        raise DataError(f"{stream_path}: retention entry {entry!r} names no task; write lm_eval:TASK[,TASK...]")
    return tasks


def _train_task(entry, path: Path) -> Task:
    """A stream's train-task entry: a task directory, or `{task: DIR, train: [PARTS], lr: LR}` (both optional) to let
    only those model parts learn during that task and at that learning rate (LLaVA stage 1: `train: [projectors]`,
    `lr: 1.0e-3`)."""
    if not isinstance(entry, dict):
        return load_task(path.parent / str(entry))
    parts, lr = entry.get("train"), entry.get("lr")
    bad_parts = parts is not None and (not isinstance(parts, list) or not parts or set(parts) - set(MODEL_PARTS))
    bad_lr = lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0)
    if set(entry) - {"task", "train", "lr"} or "task" not in entry or bad_parts or bad_lr:
        raise DataError(f"{path}: task entry {entry}: write a task directory, or {{task: DIR, train: [PARTS], lr: LR}} "
                        f"with PARTS from {', '.join(MODEL_PARTS)} and LR > 0 (both optional)")
    task = load_task(path.parent / str(entry["task"]))
    task.train_parts = list(parts) if parts else None
    task.train_lr = float(lr) if lr is not None else None
    return task


def load_stream(path: str | Path, order: list[str] | None = None) -> Stream:
    """Load a stream file; `order` (task names) re-orders its train tasks, e.g. for task-order studies."""
    path = Path(path)
    data = _read_yaml(path)
    if not data.get("tasks"):
        raise DataError(f"{path}: a stream needs a non-empty 'tasks' list of task directories")
    if not isinstance(data["tasks"], list):
        raise DataError(f"{path}: 'tasks' must be a list of task directories")
    tasks = [_train_task(entry, path) for entry in data["tasks"]]
    retention = [t for entry in data.get("retention") or [] for t in retention_tasks(entry, path)]
    names = [t.name for t in tasks + retention]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: task names must be unique; repeated: {', '.join(dupes)}")
    if order:
        by_name = {t.name: t for t in tasks}
        unknown = [n for n in order if n not in by_name]
        if unknown or sorted(order) != sorted(by_name):
            raise DataError(
                f"data.order must be a permutation of the stream's tasks {list(by_name)}; got {order}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        tasks = [by_name[n] for n in order]
    return Stream(str(data.get("name", path.stem)), tasks, retention, path, str(data.get("description", "")))


def validate_path(path: str | Path, *, allow_outside_root: bool = False,
                  data_root: str | Path | None = None) -> tuple[int, list[Problem]]:
    """Check a stream file, a task (dir or task.yaml), a world directory, or a bare records file (`.jsonl`, LLaVA
    `.json` list; media relative to its folder unless `data_root`); return (records checked, problems)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (give a records .jsonl/.json file, a task, a stream YAML or a world)")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        tasks = [records_file_task(path, Path(data_root) if data_root else None)]
    elif path.is_dir() and (path / "world.json").exists():
        streams = json.loads((path / "world.json").read_text()).get("streams", {})
        tasks = {t.manifest: t for s in streams.values() for t in load_stream(path / s).all_tasks}.values()
    elif path.suffix in (".yaml", ".yml") and path.name != "task.yaml":
        tasks = load_stream(path).all_tasks
    else:
        tasks = [load_task(path)]
    total, problems = 0, []
    for task in tasks:
        for split in task.splits:
            good, bad = read_records(task, split, allow_outside_root=allow_outside_root)
            total += len(good) + len(bad)
            problems += bad
    return total, problems
