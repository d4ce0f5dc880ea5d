"""Shared set-up for the benchmarks: the built-in world and tiny model (cached under $MMCL_HOME), records, stats."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
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


# -- backends: every model family mmcl trains, each on its tiny model ------------------------------------------------

BACKENDS = ("mmcl", "llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "blip-2",
            "instructblip", "qwen2_audio")
"""The built-in composition ("mmcl": the built-in tiny model) and each native Hugging Face family (a tiny random
checkpoint written by tests/tiny_hf, saved the way a Hugging Face user saves one)."""

TASK_FOR_MODALITY = {"image": "color_qa", "audio": "audio_qa"}
"""The built-in world's task each backend trains on: the image task, or the audio one for a model that reads no
images (Qwen2-Audio)."""


def quiet_hf() -> None:
    """No weight-loading progress bars or info logs from transformers in the benchmark output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def backend_model_path(name: str, model_path: Path, scratch: Path) -> Path:
    """The model directory of backend `name`: the built-in tiny model for "mmcl", else the family's tiny random
    checkpoint written (in well under a second) under `scratch`."""
    if name == "mmcl":
        return model_path
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from tiny_hf import BUILDERS

    return BUILDERS[name](scratch / name)


def backend_modality(processor) -> str:
    """The modality a backend is benchmarked on: image when it reads images, else audio."""
    return "image" if "image" in processor.modalities else "audio"


# -- paired rounds with a confidence interval on the ratio -----------------------------------------------------------

# two-sided 95% Student t quantiles t(0.975, df) for df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table to 30, Cornish-Fisher beyond: error
    below 1e-4)."""
    if df < 1:
        return float("inf")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ratio_interval(ratios: list[float]) -> dict:
    """Geometric mean of paired per-round ratios with its 95% t-interval (computed on the log-ratios, so it is
    symmetric in a ratio and its inverse): `ratio`, `low`, `high`, `rel_half_width` = (high-low)/2/ratio."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = statistics.fmean(logs)
    half = t975(n - 1) * statistics.stdev(logs) / math.sqrt(n) if n > 1 else float("inf")
    ratio, low, high = math.exp(mean), math.exp(mean - half), math.exp(mean + half)
    return {"ratio": ratio, "low": low, "high": high, "rel_half_width": (high - low) / 2 / ratio, "n": n,
            "log_sd": statistics.stdev(logs) if n > 1 else float("nan")}


def rounds_needed(log_sd: float, half_width: float) -> int:
    """About how many rounds a ±`half_width` interval needs when the per-round log-ratios scatter by `log_sd`."""
    if not math.isfinite(log_sd):
        return 0
    n = 2
    while t975(n - 1) * log_sd / math.sqrt(n) > math.asinh(half_width) and n < 100000:
        n += 1
    return n


@dataclass
class Timed:
    """One timed training run."""

    rate: float
    """Steps/s of the whole call (its own set-up included)."""
    cpu_rate: float
    """Steps per CPU-second of this process over the same call."""
    losses: list[float]
    """Per-step losses (to check that both sides computed the same thing)."""
    stamps: list[float] = field(default_factory=list)
    """`time.perf_counter()` at the end of each step, when the run records them."""

    @property
    def loop_rate(self) -> float | None:
        """Steps/s from the end of the first step to the end of the last: the loop alone, set-up excluded."""
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return None
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def paired_rounds(run_a, run_b, *, steps: int, min_rounds: int, max_rounds: int, budget_s: float,
                  half_width: float = 0.03, log=None) -> dict:
    """Paired rounds of `run_a(steps)` and `run_b(steps)` (each returns a `Timed`) back to back, the order flipping
    every round, until the 95% interval of the paired ratio a/b (steps/s) is narrower than ±`half_width` of the
    ratio, or `max_rounds` rounds or `budget_s` seconds are spent (checked after even rounds only, so both orders
    count equally; at least `min_rounds`). Both sides train the same batches from the same weights, so their
    per-step losses are compared too (`max_loss_diff`).
    """
    runs: dict[str, list[Timed]] = {"a": [], "b": []}
    max_loss_diff = 0.0
    start = time.perf_counter()
    converged = False
    while True:
        r = len(runs["a"])
        for which in (("a", "b") if r % 2 == 0 else ("b", "a")):
            runs[which].append(run_a(steps) if which == "a" else run_b(steps))
        la, lb = runs["a"][-1].losses, runs["b"][-1].losses
        if len(la) != len(lb):
            raise AssertionError(f"the two sides took different numbers of steps ({len(la)} vs {len(lb)})")
        max_loss_diff = max(max_loss_diff, max(abs(x - y) for x, y in zip(la, lb)))
        n = r + 1
        if n < max(min_rounds, 2) or n % 2:
            continue
        ci = ratio_interval([a.rate / b.rate for a, b in zip(runs["a"], runs["b"])])
        if log:
            log(f"  {n} rounds: ratio {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
                f" ±{100 * ci['rel_half_width']:.1f}%")
        if ci["rel_half_width"] < half_width:
            converged = True
            break
        if n >= max_rounds or time.perf_counter() - start > budget_s:
            break
    a, b = runs["a"], runs["b"]
    per_round = [x.rate / y.rate for x, y in zip(a, b)]
    out = {
        "rounds": len(per_round),
        "steps_per_round": steps,
        "a_steps_per_s": spread([x.rate for x in a]),
        "b_steps_per_s": spread([y.rate for y in b]),
        "per_round_ratio": spread(per_round),
        "interval": ratio_interval(per_round),
        "converged": converged,
        "rounds_needed": rounds_needed(ratio_interval(per_round)["log_sd"], half_width),
        "target_half_width": half_width,
        "max_rounds": max_rounds,
        "budget_s": budget_s,
        "seconds": time.perf_counter() - start,
        # steps per CPU-second of this process: insensitive to other processes taking the cores (secondary metric)
        "a_steps_per_cpu_s": spread([x.cpu_rate for x in a]),
        "b_steps_per_cpu_s": spread([y.cpu_rate for y in b]),
        "cpu_interval": ratio_interval([x.cpu_rate / y.cpu_rate for x, y in zip(a, b)]),
        "max_loss_diff": max_loss_diff,
    }
    if all(x.loop_rate for x in a + b):
        out["a_loop_steps_per_s"] = spread([x.loop_rate for x in a])
        out["b_loop_steps_per_s"] = spread([y.loop_rate for y in b])
        out["loop_interval"] = ratio_interval([x.loop_rate / y.loop_rate for x, y in zip(a, b)])
    return out


def stream_context(names: list[str], task_paths: list[Path], run_dir: Path, model_path: Path,
                   retention: list[Path] = (), **strategy_options):
    """(ctx, strategies, cfg): a run's context for the strategies `names` on a stream of `task_paths` (and
    `retention` tasks), exactly as the engine builds it, up to and including `prepare_model`; global batch 16."""
    import yaml

    from mmcl.config import DataConfig, ModelConfig, RunConfig, StrategySpec, TrainConfig
    from mmcl.engine.setup import build_context, make_accelerator
    from mmcl.seeding import seed_everything

    run_dir.mkdir(parents=True, exist_ok=True)
    stream_file = run_dir / "stream.yaml"
    stream_file.write_text(yaml.safe_dump({"name": "bench", "tasks": [str(p) for p in task_paths],
                                                  "retention": [str(p) for p in retention]}))
    cfg = RunConfig(
        name=f"bench-{'-'.join(names)}", output_dir=str(run_dir),
        strategies=[StrategySpec(n, dict(strategy_options.get(n, {}))) for n in names],
        model=ModelConfig(path=str(model_path)), data=DataConfig(stream=str(stream_file)),
        train=TrainConfig(epochs=1000, batch_size=16, lr=1e-3, warmup_ratio=0.03),
    ).validate()
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    ctx, strategies, _ = build_context(cfg, accelerator, log=lambda *a: None)
    strategies.prepare_model(ctx)
    return ctx, strategies, cfg
