"""The run report: ``report.md`` + a self-contained ``report.html`` + PNGs in ``plots/``.

The report is assembled once as a list of blocks and rendered twice, so the Markdown and HTML versions always
carry the same content.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmcl.eval.metrics import compute_metrics, matrix_from_json
from mmcl.report.plots import plot_curves, plot_matrix
from mmcl.report.strategy_sections import eproj_section, llaca_section, similarity_section
from mmcl.report.tables import Table, fmt, matrix_table, metric_value, row_labels, summary_rows

__all__ = ["write_report"]

EXAMPLES_PER_TASK = 4
CONFIG_KEYS = ("name", "model", "strategies", "strategy", "stream", "data", "seed")
CONFIG_MAX_LINES = 12
# A per-sample score at or above this counts as "correct" (accuracy-type samples are 0 or 100; VQA gives 2/3 credit).
CORRECT_AT = 50.0


@dataclass(frozen=True)
class Block:
    """One piece of the report: kind is h1/h2/h3, p, img (content = path, extra = alt text), table or pre."""

    kind: str
    content: Any
    extra: str = ""


# ---------------------------------------------------------------------------------------------- run inputs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix or delete the file") from None


def _final_predictions(run_dir: Path) -> tuple[str | None, dict[str, list[dict]]]:
    """The predictions of the last evaluated row: (row dir name, {task: records})."""
    rows = [(int(m.group(1)), d) for d in (run_dir / "predictions").glob("row-*")
            if d.is_dir() and (m := re.fullmatch(r"row-(\d+)", d.name))]  # fmt: skip
    if not rows:
        return None, {}
    _, last = max(rows)
    out = {}
    for f in sorted(last.glob("*.jsonl")):
        lines = f.read_text(encoding="utf-8").splitlines()
        out[f.stem] = [json.loads(line) for line in lines if line.strip()]
    return last.name, out


def _config_excerpt(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        cfg = None
    picked = {k: cfg[k] for k in CONFIG_KEYS if isinstance(cfg, dict) and k in cfg}
    if not picked:
        return "\n".join(text.splitlines()[:CONFIG_MAX_LINES * 2])
    parts = []
    for key, value in picked.items():
        lines = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).splitlines()
        parts += lines[:CONFIG_MAX_LINES] + (["  ..."] if len(lines) > CONFIG_MAX_LINES else [])
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ sections


def _what_happened(A: np.ndarray, tasks: list[str], metrics: dict) -> str:
    T = A.shape[0] - 1
    if T == 0:
        return f"No task trained yet: only the initial evaluation of {len(tasks)} tasks is recorded."
    status = "" if T == len(tasks) else f" (run in progress or stopped early: {len(tasks) - T} still to train)"
    parts = [f"Trained {T} of {len(tasks)} tasks ({' → '.join(tasks[:T])}){status}."]
    facts = []
    if (faa := metric_value(metrics, "final_average_accuracy")) is not None:
        facts.append(f"Final average accuracy {faa:.1f}")
    if (fgt := metric_value(metrics, "forgetting")) is not None:
        facts.append(f"tasks forgot {fgt:.1f} points on average from their best" if fgt >= 0
                     else f"tasks ended {-fgt:.1f} points above their earlier best on average")  # fmt: skip
    if (pla := metric_value(metrics, "plasticity")) is not None:
        facts.append(f"new tasks scored {pla:.1f} right after training")
    if (drop := metric_value(metrics, "retention_drop")) is not None:
        facts.append(f"language retention dropped {drop:.1f} points" if drop >= 0
                     else f"language retention rose {-drop:.1f} points")  # fmt: skip
    if facts:
        parts.append("; ".join(facts) + ".")
    if (worst := _most_forgotten(A)) is not None:
        i, best = worst
        parts.append(f"Most forgotten: {tasks[i]} ({best:.1f} at best → {A[T, i]:.1f} at the end).")
    return " ".join(parts)


def _most_forgotten(A: np.ndarray) -> tuple[int, float] | None:
    """(task index, best score) of the task with the largest drop from its best to the final row, if any dropped."""
    T = A.shape[0] - 1
    drops = []
    for i in range(T - 1):
        best = A[i + 1 : T, i]  # rows from "just trained" to the one before last, as in the forgetting metric
        if np.isfinite(best).all() and np.isfinite(A[T, i]):
            drops.append((float(best.max() - A[T, i]), i, float(best.max())))
    if not drops or max(drops)[0] <= 0:
        return None
    _, i, best_score = max(drops)
    return i, best_score


def _per_task_table(A: np.ndarray, tasks: list[str]) -> Table:
    T = A.shape[0] - 1
    labels = row_labels(tasks, A.shape[0])
    rows = []
    for i, name in enumerate(tasks):
        col = A[:, i]
        if i < T:
            seen = col[i + 1 :]
            best_row = i + 1 + int(np.nanargmax(seen)) if np.isfinite(seen).any() else None
            best = fmt(col[best_row], 1) + f" ({labels[best_row]})" if best_row is not None else fmt(None)
            gap = fmt(col[T] - col[best_row], 1) if best_row is not None else fmt(None)
            rows.append([name, str(i + 1), fmt(col[0], 1), fmt(col[i + 1], 1), best, fmt(col[T], 1), gap])
        else:
            rows.append([name, "not yet", fmt(col[0], 1), fmt(None), fmt(None), fmt(col[T], 1), fmt(None)])
    headers = ["task", "order", "initial", "just trained", "best since trained", "final", "final − best"]
    return Table(headers, rows)


def _retention_table(R: np.ndarray, retention: list[str]) -> Table:
    rows = [[name, fmt(R[0, k], 1), fmt(R[-1, k], 1), fmt(R[-1, k] - R[0, k], 1)] for k, name in enumerate(retention)]
    return Table(["retention task", "initial", "final", "change"], rows)


def _language_section(change: Any, labels: list[str]) -> list[Block]:
    """P1's language change (``metrics.json`` ``language_change``) after every row, when the stream has language
    probes or benchmarks."""
    if not isinstance(change, dict) or not isinstance(change.get("per_row"), list):
        return []
    rows = change["per_row"]
    tasks = change.get("tasks") or {}
    table = Table(["change (base − now)", "columns", *labels[1:len(rows) + 1]], [
        [name, ", ".join(tasks.get(kind, [])) if kind != "nl" else "all of them",
         *(fmt(r.get(kind), 2) for r in rows)]
        for kind, name in (("nlu", "NLU Δ"), ("nlg", "NLG Δ"), ("nl", "NL Δ (all language tasks)"))
        if change.get(kind) is not None])  # fmt: skip
    why = ("P1's language change: the harmonic mean of the base model's scores (row 0) minus that of the model "
           "after each task, in points over the NLU and the NLG columns and over all of them (zeros count as "
           "0.001). Positive means language skill lost, negative gained; lower is better. The NLU probe scores % "
           "correct on cloze multiple choice by log-likelihood (chance 25); the NLG probe scores 100 / per-byte "
           "perplexity of held-out prose (higher is better).")
    return [Block("h2", "Language change (P1)"), Block("p", why), Block("table", table)]


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m {sec:02d}s" if h else (f"{m}m {sec:02d}s" if m else f"{seconds:.1f} s")


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{int(n):,} ({n / scale:.2f}{unit})"
    return f"{int(n):,}"


def _cost_table(cost: dict) -> Table:
    def num(key: str) -> float | None:
        v = cost.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    mib = 2.0**20
    rows = []
    for key, label, show in [
        ("wall_time_s", "wall time", _duration),
        ("train_time_s", "training time", _duration),
        ("eval_time_s", "evaluation time", _duration),
        ("strategy_time_s", "strategy time outside the steps (teachers, pseudo targets, importance)", _duration),
        ("steps", "optimizer steps", lambda v: f"{int(v):,}"),
        ("time_per_step_s", "time per step", lambda v: f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"),
        ("samples_per_s", "samples per second", lambda v: f"{v:.1f}"),
        ("peak_memory_bytes", "peak memory", lambda v: f"{v / mib:,.0f} MiB"),
        ("trainable_parameters", "trainable parameters", _count),
        ("total_parameters", "total parameters", _count),
        ("extra_state_bytes", "extra strategy state", lambda v: f"{v / mib:,.1f} MiB"),
    ]:
        if (v := num(key)) is not None:
            rows.append([label, show(v)])
    trainable, total = num("trainable_parameters"), num("total_parameters")
    if trainable is not None and total:
        rows.append(["trainable share", f"{100 * trainable / total:.2f}%"])
    return Table(["cost", "value"], rows)


def _early_stopping_table(record: dict) -> Table:
    """Per task: epochs trained, the best (kept) epoch and the validation score after every epoch."""
    rows = [[task, str(r.get("epochs", "")), str(r.get("best_epoch", "")),
             ", ".join(fmt(v, 1) for v in r.get("val_scores", []))] for task, r in record.items()]
    return Table(["task", "epochs trained", "best epoch (kept)", "validation score per epoch"], rows)


def _short(text: Any, limit: int) -> str:
    text = " ".join(str(text).replace("<image>", "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _examples_table(records: list[dict]) -> Table:
    """Up to two incorrect then two correct samples, in file order, so both failure and success show."""
    def correct(r: dict) -> bool:
        return isinstance(r.get("score"), (int, float)) and r["score"] >= CORRECT_AT

    wrong_all, right_all = [r for r in records if not correct(r)], [r for r in records if correct(r)]
    right = right_all[: EXAMPLES_PER_TASK - min(len(wrong_all), EXAMPLES_PER_TASK // 2)]
    wrong = wrong_all[: EXAMPLES_PER_TASK - len(right)]
    rows = []
    for r in wrong + right:
        refs = r.get("references") or []
        ref = " / ".join(str(x) for x in refs[:3]) if isinstance(refs, list) else str(refs)
        rows.append([
            _short(r.get("id", ""), 24), _short(r.get("prompt", ""), 60), _short(r.get("prediction", ""), 60),
            _short(ref, 60), fmt(r.get("score"), 1), "✓ correct" if correct(r) else "✗ incorrect",
        ])  # fmt: skip
    return Table(["id", "prompt", "prediction", "reference", "score", "verdict"], rows)


# ------------------------------------------------------------------------------------------------ assembly


def _blocks(run_dir: Path, matrix: dict, metrics: dict, cost: dict | None) -> list[Block]:
    A, R, tasks, retention = matrix_from_json(matrix, source=str(run_dir / "matrix.json"))
    out = [
        Block("h1", f"Run report: {run_dir.name}"),
        Block("p", _what_happened(A, tasks, metrics)),
        Block("h2", "Accuracy matrix"),
        Block("img", "plots/matrix.png", "accuracy matrix heatmap"),
        Block("table", matrix_table(A, R, tasks, retention)),
        Block("h2", "Scores over training"),
        Block("img", "plots/curves.png", "per-task score curves"),
        Block("h2", "Metrics"),
        Block("table", summary_rows(metrics)),
        Block("h2", "Per task: final vs best"),
        Block("table", _per_task_table(A, tasks)),
    ]
    if retention:
        out += [Block("h2", "Retention (evaluated, never trained)"), Block("table", _retention_table(R, retention))]
        out += _language_section(metrics.get("language_change"), row_labels(tasks, A.shape[0]))
    out.append(Block("h2", "Cost"))
    cost_table = _cost_table(cost or {})
    if cost is None:
        out.append(Block("p", "No cost.json in the run directory."))
    elif not cost_table.rows:
        out.append(Block("p", "cost.json records none of the known cost fields."))
    else:
        out.append(Block("table", cost_table))
    if isinstance((cost or {}).get("early_stopping"), dict) and cost["early_stopping"]:
        out += [Block("h2", "Early stopping"), Block("table", _early_stopping_table(cost["early_stopping"]))]
    alt = {"plots/similarity.png": "task similarity heatmap", "plots/llaca_weights.png": "LLaCA weight histogram"}
    for kind, content in similarity_section(run_dir) + eproj_section(run_dir) + llaca_section(run_dir):
        out.append(Block(kind, content, alt.get(content, "") if kind == "img" else ""))
    row_name, predictions = _final_predictions(run_dir)
    if predictions:
        out.append(Block("h2", f"Example predictions ({row_name})"))
        out.append(Block("p", f"Up to {EXAMPLES_PER_TASK} per task, incorrect ones first; "
                              f"a sample counts as correct when its score is at least {CORRECT_AT:.0f}."))  # fmt: skip
        for task, records in predictions.items():
            out += [Block("h3", task), Block("table", _examples_table(records))]
    if (excerpt := _config_excerpt(run_dir / "config.yaml")) is not None:
        out += [Block("h2", "Configuration (excerpt of config.yaml)"), Block("pre", excerpt)]
    return out


def _markdown(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(b.kind[1]) + " " + b.content)
        elif b.kind == "p":
            parts.append(b.content)
        elif b.kind == "img":
            parts.append(f"![{b.extra}]({b.content})")
        elif b.kind == "table":
            parts.append(b.content.markdown())
        elif b.kind == "pre":
            parts.append(f"```yaml\n{b.content}\n```")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #2e7d32; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { padding: .3em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f3f6f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
"""


def _html(blocks: list[Block], run_dir: Path) -> str:
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{html.escape(b.content)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{html.escape(b.content)}</p>")
        elif b.kind == "img":
            data = base64.b64encode((run_dir / b.content).read_bytes()).decode("ascii")
            parts.append(f'<p><img alt="{html.escape(b.extra)}" src="data:image/png;base64,{data}"></p>')
        elif b.kind == "table":
            parts.append(b.content.html())
        elif b.kind == "pre":
            parts.append(f"<pre>{html.escape(b.content)}</pre>")
    title = html.escape(blocks[0].content)
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")  # fmt: skip


def write_report(run_dir: Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` for a run directory; returns the report.md path.

    Needs ``matrix.json``; ``metrics.json`` is recomputed from the matrix when absent, and ``cost.json``,
    ``config.yaml`` and ``predictions/`` are shown when present.
    """
    run_dir = Path(run_dir)
    matrix_path = run_dir / "matrix.json"
    if not matrix_path.is_file():
        raise FileNotFoundError(f"{matrix_path}: no accuracy matrix; is {run_dir} a run directory?")
    matrix = _read_json(matrix_path)
    matrix_from_json(matrix, source=str(matrix_path))  # fail early with the file's name in the message
    metrics_path, cost_path = run_dir / "metrics.json", run_dir / "cost.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else compute_metrics(matrix)
    cost = _read_json(cost_path) if cost_path.is_file() else None
    if cost is not None and not isinstance(cost, dict):
        raise ValueError(f"{cost_path}: expected a JSON object of cost fields, got {type(cost).__name__}")
    plot_matrix(matrix, run_dir / "plots" / "matrix.png")
    plot_curves(matrix, run_dir / "plots" / "curves.png")
    blocks = _blocks(run_dir, matrix, metrics, cost)
    (run_dir / "report.html").write_text(_html(blocks, run_dir), encoding="utf-8")
    report = run_dir / "report.md"
    report.write_text(_markdown(blocks), encoding="utf-8")
    return report
