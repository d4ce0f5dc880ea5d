"""Tables of a run report, built once as ``Table`` objects and rendered to Markdown, HTML or plain text."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["COMPARE_METRICS", "ComparisonReport", "Table", "comparison_report", "comparison_table", "comparison_text",
           "fmt", "matrix_table", "row_labels", "summary_table"]

MISSING = "n/a"


def fmt(value: Any, digits: int = 2) -> str:
    """A number with fixed decimals; ``n/a`` for None/NaN so gaps are visible, not blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    return f"{value:.{digits}f}"


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", "").replace("*", "").split()[0])
    except (ValueError, IndexError):
        return False
    return True


@dataclass(frozen=True)
class Table:
    """A header row plus body rows of plain strings (escaping happens at render time)."""

    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

        numeric = [bool(self.rows) and all(_looks_numeric(r[k]) or r[k] == MISSING for r in self.rows)
                   for k in range(len(self.headers))]  # fmt: skip
        rule = "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"
        return "\n".join([line(self.headers), rule, *(line(r) for r in self.rows)])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def text(self) -> str:
        """Fixed-width columns for a terminal."""
        widths = [max(len(h), *(len(r[k]) for r in self.rows)) for k, h in enumerate(self.headers)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(self.headers), rule, *(line(r) for r in self.rows)])


def row_labels(tasks: list[str], num_rows: int) -> list[str]:
    """"initial", "after t1", ... for the rows present."""
    return ["initial"] + [f"after {t}" for t in tasks[: num_rows - 1]]


def matrix_table(A: np.ndarray, R: np.ndarray, tasks: Sequence[str], retention: Sequence[str]) -> Table:
    """The accuracy matrix as numbers: one row per evaluation (initial, after each task), one column per train task
    and then per retention task (marked `(ret.)`); not yet trained cells included, as the heatmap shows them."""
    labels = row_labels(list(tasks), A.shape[0])
    headers = ["row", *tasks, *(f"{r} (ret.)" for r in retention)]
    rows = [[label, *(fmt(float(v), 1) for v in A[j]), *(fmt(float(v), 1) for v in (R[j] if len(retention) else []))]
            for j, label in enumerate(labels)]
    return Table(headers, rows)


def _html_cell(cell: str) -> str:
    bold = cell.startswith("**") and cell.endswith("**") and len(cell) > 4
    text = html.escape(cell[2:-2] if bold else cell)
    cls = ' class="num"' if _looks_numeric(cell) else ""
    return f"<td{cls}>{'<b>' + text + '</b>' if bold else text}</td>"


# ------------------------------------------------------------------------------------------- metrics table

# (key in metrics.json, label, explanation); the explanations are what a reader needs to judge the number.
METRIC_ROWS: list[tuple[str, str, str]] = [
    ("final_average_accuracy", "final average accuracy",
     "mean score over all trained tasks after the last one; higher is better"),
    ("average_incremental_accuracy", "average incremental accuracy",
     "mean, over training stages, of the average score on the tasks seen so far; higher is better"),
    ("forgetting", "forgetting",
     "mean drop from each task's best score to its final score (last task excluded); lower is better"),
    ("backward_transfer", "backward transfer",
     "mean change on each task from right after learning it to the end; negative means forgetting"),
    ("forward_transfer", "forward transfer",
     "mean gain on each task from the earlier tasks, before training on it; higher is better"),
    ("plasticity", "plasticity",
     "mean score on each task right after learning it; higher is better"),
    ("retention_drop", "retention drop",
     "mean drop on the evaluate-only (e.g. language) tasks from initial to final; lower is better"),
    ("linguistic_forgetting", "linguistic forgetting",
     "harmonic mean of the retention scores, initial minus final (zeros counted as 0.001); lower is better"),
    ("num_tasks_trained", "tasks trained", "number of tasks trained so far"),
]  # fmt: skip


def metric_value(metrics: Mapping[str, Any], key: str) -> Any:
    """The scalar behind ``key``; ``retention_drop`` is stored as {"per_task", "mean"}, ``nlu_change`` and
    ``nlg_change`` inside ``language_change`` (metrics.json) or on their own (`mmcl compare`)."""
    if key in ("nlu_change", "nlg_change") and key not in metrics:
        return (metrics.get("language_change") or {}).get(key[:3])
    value = metrics.get(key)
    if isinstance(value, Mapping):
        return value.get("mean")
    return value


def _fmt_metric(metrics: Mapping[str, Any], key: str) -> str:
    value = metric_value(metrics, key)
    if key == "num_tasks_trained" and isinstance(value, (int, float)):
        return str(int(value))
    return fmt(value)


def summary_rows(metrics: Mapping[str, Any]) -> Table:
    """The metrics with a one-line explanation each."""
    rows = [[label, _fmt_metric(metrics, key), why] for key, label, why in METRIC_ROWS if key in metrics]
    return Table(["metric", "value", "what it means"], rows)


def summary_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table of a ``metrics.json`` dict with short human explanations."""
    return summary_rows(metrics).markdown()


# ---------------------------------------------------------------------------------------- comparison table

# (key, short header, higher is better)
COMPARE_METRICS: list[tuple[str, str, bool]] = [
    ("final_average_accuracy", "final acc ↑", True),
    ("average_incremental_accuracy", "avg incr acc ↑", True),
    ("forgetting", "forgetting ↓", False),
    ("backward_transfer", "BWT ↑", True),
    ("forward_transfer", "FWT ↑", True),
    ("plasticity", "plasticity ↑", True),
    ("retention_drop", "retention drop ↓", False),
    ("linguistic_forgetting", "ling. forgetting ↓", False),
    ("nlu_change", "NLU Δ ↓", False),
    ("nlg_change", "NLG Δ ↓", False),
]


def _comparison(runs: Mapping[str, Mapping[str, Any]], mark: Callable[[str], str]) -> Table:
    """One row per run label; ``mark`` decorates the best value of each column (only with 2+ runs)."""
    labels = list(runs)
    columns, headers = [], []
    for key, header, higher in COMPARE_METRICS:
        values = [metric_value(runs[label], key) for label in labels]
        if key.endswith("_change") and all(v is None for v in values):
            continue  # a language change only where a run has language columns
        headers.append(header)
        present = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        best = (max(present) if higher else min(present)) if len(present) >= 2 else None
        columns.append([mark(fmt(v)) if best is not None and v == best else fmt(v) for v in values])
    rows = [[label, *(col[r] for col in columns)] for r, label in enumerate(labels)]
    return Table(["run", *headers], rows)


def comparison_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table comparing runs (e.g. sequential vs joint), one row per label, best value in bold."""
    return _comparison(runs, lambda s: f"**{s}**").markdown()


def comparison_text(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The comparison as aligned plain text for a terminal; ``*`` marks the best value of each column."""
    return _comparison(runs, lambda s: f"{s}*").text()


# ----------------------------------------------------------------------- `mmcl compare` (with intervals)

_COSTS = [("time_per_step_s", "s/step", 1.0, 3), ("peak_memory_bytes", "peak MiB", 2**20, 0),
          ("trainable_parameters", "trainable", 1.0, 0), ("extra_state_bytes", "extra state MiB", 2**20, 2)]
SIGNIFICANT = "*"


@dataclass(frozen=True)
class ComparisonReport:
    """The tables of `mmcl compare`: all of them as Markdown (comparison.md), the main ones as terminal text."""

    markdown: str
    text: str


def _ci_cell(stat: Mapping[str, Any] | None, digits: int = 2, *, key: str = "mean", sign: bool = False,
             unit: str = "", mark: bool = False) -> str:
    """`mean [lo, hi]` (or `+diff [lo, hi]`), `*` appended when `mark`; n/a when there is no value."""
    value = None if stat is None else stat.get(key)
    if value is None:
        return MISSING
    spec = f"{'+' if sign else ''}.{digits}f"
    cell = f"{value:{spec}}{unit}"
    if stat.get("ci"):
        lo, hi = stat["ci"]
        cell += f" [{lo:{spec}}, {hi:{spec}}]"
    return cell + (f" {SIGNIFICANT}" if mark else "")


def _std_cell(stat: Mapping[str, Any], scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return MISSING
    mean, std = stat["mean"] / scale, stat["std"] / scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if stat["n"] > 1 else f"{mean:.{digits}f}"


def _present(methods: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """The metrics with a value for at least one method (e.g. no retention columns without retention tasks)."""
    return [m for m in COMPARE_METRICS if any(s[m[0]]["mean"] is not None for s in methods.values())]


def comparison_report(summary: Mapping[str, Any]) -> ComparisonReport:
    """Render a `comparison.json` dict: metrics with intervals and significance marks, the paired differences from
    the baseline, cost, final score per task (with single-task ceilings) and the share of each ceiling."""
    methods, baseline, boot = summary["methods"], summary["baseline"], summary["bootstrap"]
    metrics = _present(methods)
    level = f"{100 * boot['level']:.0f} %"

    def significant(s: Mapping[str, Any], key: str) -> bool:
        return bool(s.get("vs_baseline", {}).get(key, {}).get("significant"))

    main = Table(["method", *(h for _, h, _ in metrics)],
                 [[label, *(_ci_cell(s[k], mark=significant(s, k)) for k, _, _ in metrics)]
                  for label, s in methods.items()])
    diff = Table(["method", *(f"Δ {h}" for _, h, _ in metrics)],
                 [[label, *(_ci_cell(s["vs_baseline"][k], key="diff", sign=True, mark=significant(s, k))
                            for k, _, _ in metrics)] for label, s in methods.items() if "vs_baseline" in s])
    cost = Table(["method", *(h for _, h, _, _ in _COSTS)],
                 [[label, *(_std_cell(s[k], scale, d) for k, _, scale, d in _COSTS)] for label, s in methods.items()])
    single = summary.get("single_task")
    tasks: list[str] = []
    for s in methods.values():
        tasks += [t for t in s["final_per_task"] if t not in tasks]
    final_rows = [[label, *(_ci_cell(s["final_per_task"].get(t), 1) for t in tasks)] for label, s in methods.items()]
    if single:
        final_rows.append(["single-task ceiling", *(_ci_cell(single["ceiling"].get(t), 1) for t in tasks)])
    final = Table(["method", *tasks], final_rows)
    intro = (f"Each metric: mean over seeds (and task orders) with its {level} bootstrap interval [low, high] over "
             f"seeds and test records ({boot['resamples']} resamples, bootstrap seed {boot['seed']}: each resample "
             f"draws the seeds with replacement and, within each drawn seed, every task's test records with "
             f"replacement, and recomputes the metric from the per-record scores). `{SIGNIFICANT}`: the paired "
             f"difference from `{baseline}` is significant (its {level} interval excludes 0).")
    parts = [intro, main.markdown(),
             f"## Difference from {baseline}\n\nMethod minus `{baseline}`, paired: both use the same resampled seeds "
             f"and test records (matched by id). `{SIGNIFICANT}`: the {level} interval excludes 0; ↑/↓ in the "
             f"header say which sign is better.\n\n" + (diff.markdown() if diff.rows else "(one method only)"),
             "## Cost\n\nMean ± std over runs.\n\n" + cost.markdown(),
             "## Final score per task\n\nAfter the last task (retention tasks: never trained), mean [interval]."
             + (" The last row: each task fine-tuned alone from the base model (same steps), its ceiling."
                if single else "") + "\n\n" + final.markdown()]
    texts = [main.text()] + ([f"difference from {baseline} ({SIGNIFICANT}: significant)\n" + diff.text()]
                             if diff.rows else [])
    if single:
        train = list(single["ceiling"])
        share = Table(["method", *train, "mean"], [
            [label, *(_ci_cell(s["share_of_ceiling"].get(t), 0, unit=" %") for t in train),
             _mean_share(s["share_of_ceiling"], train)] for label, s in methods.items()])
        parts.append("## Share of the single-task ceiling\n\nEach method's final score on a task as a percentage of "
                     f"the task's single-task ceiling, with its {level} interval (ratio of the resampled means; n/a "
                     "where the ceiling is 0); `mean`: the average share over the tasks.\n\n" + share.markdown())
        texts.append("final score as a share of the single-task ceiling\n" + share.text())
    return ComparisonReport("\n\n".join(parts), "\n\n".join(texts))


def _mean_share(shares: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
    values = [shares[t]["mean"] for t in tasks if t in shares]
    if not values or any(v is None for v in values):
        return MISSING
    return f"{sum(values) / len(values):.0f} %"
