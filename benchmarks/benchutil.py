"""Shared set-up for the benchmarks: the built-in world and tiny model (cached under $MMCL_HOME), records, stats."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def world_and_model_paths() -> tuple[Path, Path]:
    """The built-in world and tiny model, created (once) if $MMCL_HOME (default ~/.cache/mmcl) lacks them."""
    from mmcl.builtin import builtin_model, builtin_world

    world = builtin_world(progress=False)
    model = builtin_model(progress=False)
    return world, model


def load(model_path: Path):
    """(model, processor, media loader) for the tiny model, float32, on the CPU, loaded as a run loads it
    (`load_backend`); the processor holds the tokenizer (`processor.tokenizer`)."""
    from mmcl.data.batching import MediaLoader
    from mmcl.models.loading import load_backend

    model, processor = load_backend(model_path, dtype=torch.float32)
    return model, processor, MediaLoader(processor)


def records(world: Path, task_name: str, split: str):
    from mmcl.data.records import load_task, read_records

    task = load_task(world / "tasks" / task_name)
    good, bad = read_records(task, split)
    if bad:
        raise RuntimeError(f"{task_name}/{split}: {len(bad)} bad records in the built-in world")
    return task, good


def spread(values: list[float]) -> dict:
    """Median, min, max and the relative half-range ((max-min)/2/median) of a list of rates."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "rel_spread": (max(values) - min(values)) / 2 / med if med else float("nan"),
        "values": list(values),
    }


def machine() -> dict:
    import platform

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import accelerate
    import transformers

    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
