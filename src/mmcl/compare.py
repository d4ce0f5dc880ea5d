"""`mmcl compare`: several methods (x seeds x task orders) on one stream from the same base, in one table.

Each run goes to `<out>/<method>/seed-<s>[-order-<k>]` and is skipped when already complete, so an interrupted
comparison continues where it stopped. Metrics are aggregated as mean ± std over seeds and orders, next to the
cost of each method (time per step, peak memory, trainable parameters, extra state bytes).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from mmcl.config import RunConfig, load_config
from mmcl.eval.metrics import matrix_from_json
from mmcl.report.tables import Table, fmt, matrix_table

METRICS = [
    ("final_average_accuracy", "final acc ↑"),
    ("forgetting", "forgetting ↓"),
    ("backward_transfer", "BWT ↑"),
    ("forward_transfer", "FWT ↑"),
    ("plasticity", "plasticity ↑"),
    ("retention_drop", "retention drop ↓"),
]
COSTS = [
    ("time_per_step_s", "s/step"),
    ("peak_memory_bytes", "peak MiB"),
    ("trainable_parameters", "trainable"),
    ("extra_state_bytes", "extra state MiB"),
]


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


def _complete(run_dir: Path) -> bool:
    matrix = run_dir / "matrix.json"
    if not matrix.exists():
        return False
    m = json.loads(matrix.read_text())
    return len(m["rows"]) == len(m["tasks"]) + 1


def _value(metrics: dict, key: str):
    v = metrics.get(key)
    return v.get("mean") if isinstance(v, dict) else v


def run_comparison(
    base: RunConfig | None,
    config_path: str | None,
    overrides: list[str],
    methods: list[Method],
    seeds: list[int],
    orders: list[list[str] | None],
    out: Path,
    *,
    progress: bool = True,
    log=print,
) -> Path:
    """Run every (method, seed, order) not yet complete, then write comparison.{md,json} and a plot."""
    from mmcl.engine.loop import run

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for m in methods:
        for seed in seeds:
            for k, order in enumerate(orders):
                name = f"seed-{seed}" + (f"-order-{k}" if len(orders) > 1 else "")
                run_dir = out / m.label / name
                results.setdefault(m.label, []).append({"run_dir": run_dir})
                if _complete(run_dir):
                    log(f"[{m.label} {name}] complete, skipped")
                    continue
                extra = [f"strategies=[{','.join(m.strategies)}]", *m.options, f"seed={seed}",
                         f"output_dir={run_dir}", f"name={m.label}-{name}"]
                if order:
                    extra.append(f"data.order=[{','.join(order)}]")
                cfg = load_config(config_path, overrides + extra)
                log(f"[{m.label} {name}] running")
                run(cfg, resume=(run_dir / "checkpoints" / "latest").exists(), progress=progress, log=log)
    summary, matrices = {}, []
    for label, runs in results.items():
        metrics = [json.loads((r["run_dir"] / "metrics.json").read_text()) for r in runs]
        costs = [json.loads((r["run_dir"] / "cost.json").read_text()) for r in runs]
        final: dict[str, list[float]] = {}
        for r in runs:
            path = r["run_dir"] / "matrix.json"
            A, R, tasks, retention = matrix_from_json(json.loads(path.read_text()), source=str(path))
            kept = [f"{n} (ret.)" for n in retention]
            for name, value in [*zip(tasks, A[-1]), *zip(kept, R[-1] if retention else [])]:
                final.setdefault(name, []).append(float(value))
            matrices.append(f"### {label}, {r['run_dir'].name}\n\n{matrix_table(A, R, tasks, retention).markdown()}")
        summary[label] = {
            "runs": [str(r["run_dir"]) for r in runs],
            **{k: _stats([_value(m, k) for m in metrics]) for k, _ in METRICS},
            **{k: _stats([c.get(k) for c in costs]) for k, _ in COSTS},
            "final_per_task": {name: _stats(values) for name, values in final.items()},
        }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = comparison_markdown(summary)
    plot_tradeoff(summary, out / "accuracy_vs_forgetting.png")
    (out / "comparison.md").write_text(
        f"# Comparison\n\n{len(seeds)} seed(s) x {len(orders)} task order(s) per method; mean ± std.\n\n"
        f"{table}\n\n![accuracy vs forgetting](accuracy_vs_forgetting.png)\n\n"
        f"## Final score per task\n\nAfter the last task (retention tasks: never trained).\n\n"
        f"{final_scores_markdown(summary)}\n\n## Accuracy matrix of every run\n\n" + "\n\n".join(matrices) + "\n"
    )
    log(table)
    return out


def _stats(values: list) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _cell(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    if s["mean"] is None:
        return fmt(None)
    mean, std = s["mean"] / scale, s["std"] / scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if s["n"] > 1 else f"{mean:.{digits}f}"


def comparison_markdown(summary: dict) -> str:
    headers = ["method"] + [h for _, h in METRICS] + [h for _, h in COSTS]
    rows = []
    for label, s in summary.items():
        rows.append(
            [label]
            + [_cell(s[k]) for k, _ in METRICS]
            + [
                _cell(s["time_per_step_s"], digits=3),
                _cell(s["peak_memory_bytes"], 2**20, 0),
                _cell(s["trainable_parameters"], digits=0),
                _cell(s["extra_state_bytes"], 2**20, 2),
            ]
        )
    return Table(headers, rows).markdown()


def final_scores_markdown(summary: dict) -> str:
    """Method x task table of the final scores (mean ± std over the method's runs), tasks in first-seen order."""
    names: list[str] = []
    for s in summary.values():
        names += [n for n in s["final_per_task"] if n not in names]
    rows = [[label, *(_cell(s["final_per_task"][n], digits=1) if n in s["final_per_task"] else fmt(None)
                      for n in names)] for label, s in summary.items()]
    return Table(["method", *names], rows).markdown()


def plot_tradeoff(summary: dict, path: Path) -> None:
    """Final average accuracy against forgetting, one point per method with std error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, s in summary.items():
        acc, fgt = s["final_average_accuracy"], s["forgetting"]
        if acc["mean"] is None or fgt["mean"] is None:
            continue
        ax.errorbar(fgt["mean"], acc["mean"], xerr=fgt["std"], yerr=acc["std"], fmt="o", capsize=3)
        ax.annotate(label, (fgt["mean"], acc["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("forgetting (lower is better)")
    ax.set_ylabel("final average accuracy (higher is better)")
    ax.set_title("Accuracy against forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
