"""`mmcl compare`: several methods (x seeds x task orders) on one stream from the same base, in one table.

Each run goes to `<out>/<method>/seed-<s>[-order-<k>]` and is skipped when already complete, so an interrupted
comparison continues where it stopped. Every metric is reported as its mean over seeds (and orders) with a 95 %
bootstrap interval over seeds and test records (`mmcl.eval.bootstrap`, recomputed from the per-record scores in each
run's `predictions/`), its paired difference from a baseline method (sequential fine-tuning by default) marked when
significant, next to the cost of each method (time per step, peak memory, trainable parameters, extra state bytes).
With `--single-task`, each task fine-tuned alone from the base (`mmcl.single_task`) gives per-task ceilings, shown
beside every method with each method's final score as a share of them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcl.config import load_config
from mmcl.eval import bootstrap as bs
from mmcl.eval.metrics import matrix_from_json
from mmcl.report.tables import comparison_report, matrix_table
from mmcl.single_task import run_complete, run_single_task

COSTS = [
    ("time_per_step_s", "s/step"),
    ("peak_memory_bytes", "peak MiB"),
    ("trainable_parameters", "trainable"),
    ("extra_state_bytes", "extra state MiB"),
]
LEVEL = 0.95


class CompareError(ValueError):
    """Run directories that cannot be compared (missing or mismatched per-record scores); the message says which."""


@dataclass
class Method:
    label: str  # e.g. "lora[mode=merge]+soft_targets"
    strategies: list[str]
    options: list[str]  # overrides such as "strategies.lora.mode=merge"


def parse_methods(text: str) -> list[Method]:
    """`sequential,lora[mode=merge],lora+soft_targets` -> methods: `+` composes strategies into one method and
    `name[key=value;key=value]` sets a strategy's options."""
    methods = []
    for item in _split_top(text, ","):
        names, options = [], []
        for part in _split_top(item, "+"):
            name, _, opts = part.partition("[")
            names.append(name.strip())
            for kv in filter(None, (o.strip() for o in opts.rstrip("]").split(";"))):
                if "=" not in kv:
                    raise ValueError(f"--methods: option {kv!r} of {name!r} must be key=value")
                options.append(f"strategies.{name.strip()}.{kv}")
        methods.append(Method(item, names, options))
    if not methods:
        raise ValueError("--methods: give at least one method, e.g. sequential,lora,ewc")
    return methods


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside square brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def run_comparison(
    base,
    config_path: str | None,
    overrides: list[str],
    methods: list[Method],
    seeds: list[int],
    orders: list[list[str] | None],
    out: Path,
    *,
    baseline: str | None = None,
    resamples: int = 1000,
    bootstrap_seed: int = 0,
    single_task: Path | None = None,
    progress: bool = True,
    log=print,
) -> Path:
    """Run every (method, seed, order) not yet complete (and, with `single_task`, every task alone per seed into
    that directory), then write comparison.{md,json} and a plot. `base` is unused (kept for callers)."""
    from mmcl.engine.loop import run

    labels = [m.label for m in methods]
    if baseline is not None and baseline not in labels:
        raise CompareError(f"--baseline {baseline!r} is not one of --methods ({', '.join(labels)}); add it there")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds: {seeds} repeats a seed; give each seed once")
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[Path]]] = {}  # label -> [order][seed]
    for m in methods:
        for k, order in enumerate(orders):
            for seed in seeds:
                name = f"seed-{seed}" + (f"-order-{k}" if len(orders) > 1 else "")
                run_dir = out / m.label / name
                per_order = runs.setdefault(m.label, [[] for _ in orders])
                per_order[k].append(run_dir)
                if run_complete(run_dir):
                    log(f"[{m.label} {name}] complete, skipped")
                    continue
                extra = [f"strategies=[{','.join(m.strategies)}]", *m.options, f"seed={seed}",
                         f"output_dir={run_dir}", f"name={m.label}-{name}"]
                if order:
                    extra.append(f"data.order=[{','.join(order)}]")
                cfg = load_config(config_path, overrides + extra)
                log(f"[{m.label} {name}] running")
                # a run cut off before its first checkpoint holds only its config: the engine starts it afresh
                run(cfg, resume=(run_dir / "config.yaml").exists(), progress=progress, log=log)
    single = None
    if single_task is not None:
        by_task = run_single_task(config_path, overrides, seeds, single_task, progress=progress, log=log)
        single = {task: [by_seed[s] for s in seeds] for task, by_seed in by_task.items()}
    if baseline is None:
        baseline = "sequential" if "sequential" in labels else labels[0]
    summary = summarise(runs, seeds, baseline=baseline, resamples=resamples, bootstrap_seed=bootstrap_seed,
                        single=single, single_dir=single_task)
    summary["orders"] = [o for o in orders if o] or None
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_tradeoff(summary, out / "accuracy_vs_forgetting.png")
    report = comparison_report(summary)
    matrices = []
    for label, per_order in runs.items():
        for run_dir in (d for o in per_order for d in o):
            path = run_dir / "matrix.json"
            A, R, tasks, retention = matrix_from_json(json.loads(path.read_text()), source=str(path))
            matrices.append(f"### {label}, {run_dir.name}\n\n{matrix_table(A, R, tasks, retention).markdown()}")
    (out / "comparison.md").write_text(
        f"# Comparison\n\n{len(seeds)} seed(s) x {len(orders)} task order(s) per method.\n\n"
        + report.markdown + "\n\n![accuracy vs forgetting](accuracy_vs_forgetting.png)\n\n"
        "## Accuracy matrix of every run\n\n" + "\n\n".join(matrices) + "\n"
    )
    log(report.text)
    return out


# ----------------------------------------------------------------------------------- per-record scores


class _Records:
    """The test record ids of every task, fixed by the first predictions file read, so that every method's and
    seed's scores line up record by record (what the paired bootstrap needs)."""

    def __init__(self) -> None:
        self.ids: dict[str, tuple[list[str], dict[str, int], Path]] = {}

    def scores(self, path: Path, task: str) -> bs.Scores:
        """A predictions file's per-record scores in the task's fixed record order; records that carry `loglik` and
        `bytes` (the NLG probe) give a `bs.Ratio`, since that score is 100 * exp(-total NLL / total bytes)."""
        if not path.is_file():
            raise CompareError(f"{path}: per-record scores missing (the bootstrap reads predictions/row-NN/TASK.jsonl "
                               "of every row); re-run this run or remove its directory so compare runs it again")
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ids = [str(p["id"]) for p in lines]
        if task not in self.ids:
            if len(set(ids)) != len(ids):
                raise CompareError(f"{path}: repeated record ids; each test record needs a unique id")
            self.ids[task] = (ids, {i: k for k, i in enumerate(ids)}, path)
        order, pos, first = self.ids[task]
        if sorted(ids) != sorted(order):
            missing = sorted(set(order) - set(ids))[:3] or sorted(set(ids) - set(order))[:3]
            raise CompareError(f"{path}: its {len(ids)} test records differ from the {len(order)} of {first} (e.g. "
                               f"{', '.join(missing)}); compared runs must be scored on the same records (same "
                               "data.test_limit and stream)")
        where = [pos[i] for i in ids]

        def column(key: str, sign: float = 1.0) -> np.ndarray:
            out = np.empty(len(ids))
            out[where] = [sign * float(p[key]) for p in lines]
            return out

        if lines and all("loglik" in p and "bytes" in p for p in lines):
            return bs.Ratio(column("loglik", -1.0), column("bytes"), bs.per_byte_score)
        return column("score")

    @property
    def counts(self) -> dict[str, int]:
        return {t: len(v[0]) for t, v in self.ids.items()}


def _stack(items: list[bs.Scores]) -> bs.Scores:
    """np.stack for per-record scores, part by part for `bs.Ratio`s."""
    if isinstance(items[0], bs.Ratio):
        return bs.Ratio(np.stack([x.num for x in items]), np.stack([x.den for x in items]), items[0].f)
    return np.stack(items)


def _runset(run_dirs: list[Path], records: _Records) -> bs.RunSet:
    """One task order's runs (one per seed) as per-record score arrays (seeds, rows, records)."""
    metas = [json.loads((d / "matrix.json").read_text()) for d in run_dirs]
    tasks, retention = metas[0]["tasks"], metas[0].get("retention", [])
    for d, m in zip(run_dirs, metas):
        if m["tasks"] != tasks or m.get("retention", []) != retention:
            raise CompareError(f"{d / 'matrix.json'}: tasks {m['tasks']} differ from {run_dirs[0]}'s {tasks}")
    scores = {t: _stack([_stack([records.scores(d / "predictions" / f"row-{j:02d}" / f"{t}.jsonl", t)
                                 for j in range(len(tasks) + 1)]) for d in run_dirs])
              for t in [*tasks, *retention]}
    for t, X in scores.items():  # the records must reproduce the matrix
        stored = np.array([[row["scores"][t] for row in m["rows"]] for m in metas])
        values = bs.task_values(X)
        bad = np.argwhere(np.abs(values - stored) > 1e-3)
        if bad.size:
            k, j = bad[0]
            raise CompareError(f"{run_dirs[k]}: predictions/row-{j:02d}/{t}.jsonl gives {values[k, j]:.4f}, "
                               f"but matrix.json says {stored[k, j]}; the run directory is inconsistent")
    return bs.RunSet(tasks, retention, scores)


def _stats(values) -> dict:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _with_ci(per_run, samples: np.ndarray) -> dict:
    """Mean and std over runs, and the bootstrap interval of the mean."""
    return {**_stats(per_run), "ci": bs.interval(samples, LEVEL)}


TIE = 1e-9
"""Paired differences within this of 0 are ties: two methods with the same scores differ only by float rounding in
the recomputed metrics (e.g. both lose a retention task entirely), which must not count as a significant difference."""


def _difference(point: float | None, samples: np.ndarray) -> dict:
    """A paired difference: its value, interval and whether the interval excludes 0 (by more than rounding)."""
    ci = None if point is None else bs.interval(samples, LEVEL)
    return {"diff": point, "ci": ci, "significant": bool(ci is not None and (ci[0] > TIE or ci[1] < -TIE))}


def _run_metrics(orders: list[bs.RunSet]) -> dict[str, np.ndarray]:
    """Every metric of every run (orders x seeds, flattened), from the mean of its per-record scores."""
    per_order = [bs.batch_metrics(np.stack([bs.task_values(o.scores[t]) for t in o.tasks], -1),
                                  np.stack([bs.task_values(o.scores[t]) for t in o.retention], -1) if o.retention
                                  else np.zeros((*o.scores[o.tasks[0]].shape[:2], 0)), o.retention) for o in orders]
    return {k: np.concatenate([m[k] for m in per_order]) for k in bs.METRIC_KEYS}


def _run_finals(orders: list[bs.RunSet]) -> dict[str, np.ndarray]:
    """Each task's final score in every run (orders x seeds, flattened)."""
    return {t: np.concatenate([bs.task_values(o.scores[t])[:, -1] for o in orders]) for t in orders[0].scores}


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size and np.all(np.isfinite(values)) else None


def summarise(
    runs: dict[str, list[list[Path]]],
    seeds: list[int],
    *,
    baseline: str | None,
    resamples: int = 1000,
    bootstrap_seed: int = 0,
    single: dict[str, list[Path]] | None = None,
    single_dir: Path | None = None,
) -> dict:
    """The comparison as a JSON-ready dict: per method every metric's mean, std over runs and bootstrap interval,
    the paired difference from `baseline`, cost, final score per task and (with `single`: task -> run dir per seed,
    in `seeds` order) the single-task ceilings and each method's final score as a share of them."""
    records = _Records()
    sets = {label: [_runset(o, records) for o in per_order] for label, per_order in runs.items()}
    single_set = None
    if single:
        single_set = bs.RunSet(list(single), [], {t: _stack([_stack([
            records.scores(d / "predictions" / f"row-{j:02d}" / f"{t}.jsonl", t) for j in (0, 1)]) for d in dirs])
            for t, dirs in single.items()})
    draws = bs.draw(len(seeds), records.counts, resamples, bootstrap_seed)
    samples = {label: bs.metric_samples(o, draws) for label, o in sets.items()}
    points = {label: {k: _mean(v) for k, v in _run_metrics(o).items()} for label, o in sets.items()}
    ceiling, ceiling_runs = {}, {}
    if single_set:
        ceiling, ceiling_runs = bs.final_score_samples([single_set], draws), _run_finals([single_set])
    methods = {}
    for label, orders in sets.items():
        per_run, finals = _run_metrics(orders), _run_finals(orders)
        final_samples = bs.final_score_samples(orders, draws)
        cost = [json.loads((d / "cost.json").read_text()) for o in runs[label] for d in o]
        s = methods[label] = {"runs": [str(d) for o in runs[label] for d in o]}
        for key in bs.METRIC_KEYS:
            s[key] = _with_ci(per_run[key], samples[label][key])
        for key, _ in COSTS:
            s[key] = _stats([c.get(key) for c in cost])
        s["final_per_task"] = {t: _with_ci(finals[t], final_samples[t]) for t in final_samples}
        if label != baseline:
            s["vs_baseline"] = {
                key: _difference(None if points[label][key] is None or points[baseline][key] is None
                                 else points[label][key] - points[baseline][key],
                                 samples[label][key] - samples[baseline][key]) for key in bs.METRIC_KEYS}
        if ceiling:
            s["share_of_ceiling"] = {}
            for t in (t for t in ceiling if t in final_samples):
                top = _mean(ceiling_runs[t])
                with np.errstate(divide="ignore", invalid="ignore"):
                    share = 100.0 * final_samples[t] / ceiling[t]
                s["share_of_ceiling"][t] = {"mean": 100.0 * _mean(finals[t]) / top if top else None,
                                            "ci": bs.interval(share, LEVEL) if top else None}
    return {
        "seeds": seeds,
        "baseline": baseline,
        "bootstrap": {"resamples": resamples, "seed": bootstrap_seed, "level": LEVEL,
                      "over": "seeds, then each task's test records within a drawn seed (paired across methods)"},
        "methods": methods,
        "single_task": None if not single_set else {
            "dir": str(single_dir) if single_dir else None,
            "runs": {t: [str(d) for d in dirs] for t, dirs in single.items()},
            "ceiling": {t: _with_ci(ceiling_runs[t], ceiling[t]) for t in ceiling},
        },
    }


def plot_tradeoff(summary: dict, path: Path) -> None:
    """Final average accuracy against forgetting, one point per method with its 95 % bootstrap intervals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, s in summary["methods"].items():
        acc, fgt = s["final_average_accuracy"], s["forgetting"]
        if acc["mean"] is None or fgt["mean"] is None:
            continue
        err = [[[max(0.0, m["mean"] - m["ci"][0])], [max(0.0, m["ci"][1] - m["mean"])]] if m["ci"] else None
               for m in (fgt, acc)]
        ax.errorbar(fgt["mean"], acc["mean"], xerr=err[0], yerr=err[1], fmt="o", capsize=3)
        ax.annotate(label, (fgt["mean"], acc["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("forgetting (lower is better)")
    ax.set_ylabel("final average accuracy (higher is better)")
    ax.set_title("Accuracy against forgetting (95 % bootstrap intervals)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
