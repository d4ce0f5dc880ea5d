"""Continual-learning metrics: pure functions over the accuracy matrix.

``A`` has one row per evaluation (row 0 = before any training, row j = after training tasks 1..j) and one
column per train task, in training order. With R rows, ``T = R − 1`` tasks have been trained; columns beyond
T belong to tasks not trained yet (a run in progress) and are ignored. In the formulas below tasks are
1-based (i = 1..T) and rows 0-based (j = 0..T), so A[j][i] is ``A[j, i − 1]`` in the array.

Missing scores are NaN (published matrices often lack the upper triangle). A metric that needs a missing
entry is ``None`` rather than a number computed from part of the data, so runs stay comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "average_incremental_accuracy",
    "backward_transfer",
    "compute_metrics",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "language_change",
    "language_kind",
    "linguistic_forgetting",
    "load_matrix",
    "matrix_from_json",
    "plasticity",
    "retention_drop",
]

ArrayLike = np.ndarray | Sequence[Sequence[float | None]]
MatrixParts = tuple[np.ndarray, np.ndarray, list[str], list[str]]

# P1 (linguistic forgetting) replaces zero scores so the harmonic mean stays defined.
_HM_FLOOR = 1e-3


# ------------------------------------------------------------------------------------------- matrix input


def _fail(source: str, path: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{source}: {path}: {problem}; {fix}")


def _check_names(obj: dict, key: str, source: str) -> list[str]:
    names = obj[key]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _fail(source, key, f"expected a list of non-empty task names, got {names!r}", "fix the list")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(source, key, f"duplicate task names {dupes}", "give every task a unique name")
    return names


def _check_score(value: Any, source: str, path: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, path, f"expected a finite number, got {value!r}", "write the score as a number or omit it")
    return float(value)


def _check_row(row: Any, j: int, tasks: list[str], known: set[str], source: str) -> dict[str, float]:
    if not isinstance(row, dict) or "after" not in row or "scores" not in row:
        raise _fail(source, f"rows[{j}]", "expected an object with keys 'after' and 'scores'", "add the missing keys")
    expected = None if j == 0 else tasks[j - 1]
    if row["after"] != expected:
        fix = "row 0 is the model before training" if j == 0 else "rows must follow the order of 'tasks'"
        raise _fail(source, f"rows[{j}].after", f"expected {expected!r}, got {row['after']!r}", fix)
    scores = row["scores"]
    if not isinstance(scores, dict):
        raise _fail(source, f"rows[{j}].scores", f"expected an object, got {scores!r}", "map task name to score")
    out = {}
    for name, value in scores.items():
        if name not in known:
            raise _fail(
                source, f"rows[{j}].scores.{name}", "not a task in 'tasks' or 'retention'", "fix the name or add it"
            )
        out[name] = _check_score(value, source, f"rows[{j}].scores.{name}")
    return out


def matrix_from_json(obj: dict, *, source: str = "matrix.json") -> MatrixParts:
    """Validate a parsed ``matrix.json`` and split it into arrays.

    Args:
        obj: the parsed JSON object (``{"tasks", "retention" (optional), "rows"}``).
        source: file name used in error messages.

    Returns:
        ``(A, Rret, tasks, retention)``: ``A`` is (R, len(tasks)) train-task scores, ``Rret`` is
        (R, len(retention)) retention scores, NaN where a score is missing.

    Raises:
        ValueError: naming ``source``, the JSON path of the problem and the fix.
    """
    if not isinstance(obj, dict):
        raise _fail(source, "$", f"expected a JSON object, got {type(obj).__name__}", "see the matrix.json schema")
    for key in ("tasks", "rows"):
        if key not in obj:
            raise _fail(source, key, "missing required key", f"add {key!r} (see the matrix.json schema)")
    tasks = _check_names(obj, "tasks", source)
    retention = _check_names(obj, "retention", source) if "retention" in obj else []
    both = sorted(set(tasks) & set(retention))
    if both:
        raise _fail(source, "retention", f"{both} also listed in 'tasks'", "a task is either trained or retention")
    rows = obj["rows"]
    if not isinstance(rows, list) or not rows:
        raise _fail(source, "rows", "expected a non-empty list of rows", "row 0 is the model before training")
    if len(rows) > len(tasks) + 1:
        raise _fail(
            source, "rows", f"{len(rows)} rows for {len(tasks)} tasks", "expect at most one row per task plus row 0"
        )
    known = set(tasks) | set(retention)
    parsed = [_check_row(row, j, tasks, known, source) for j, row in enumerate(rows)]
    A = np.array([[r.get(t, math.nan) for t in tasks] for r in parsed], dtype=float).reshape(len(rows), len(tasks))
    Rret = np.array([[r.get(t, math.nan) for t in retention] for r in parsed], dtype=float)
    return A, Rret.reshape(len(rows), len(retention)), tasks, retention


def load_matrix(path: str | Path) -> MatrixParts:
    """Read and validate a ``matrix.json`` file; see ``matrix_from_json``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the file") from None
    return matrix_from_json(obj, source=str(path))


# ------------------------------------------------------------------------------------------------- metrics


def _to_array(M: ArrayLike) -> np.ndarray:
    if isinstance(M, np.ndarray):
        return M.astype(float)
    return np.array([[math.nan if v is None else v for v in row] for row in M], dtype=float)


def _as_matrix(A: ArrayLike) -> tuple[np.ndarray, int]:
    """Float array (None → NaN) and T, the number of trained tasks."""
    arr = _to_array(A)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be 2-D with at least row 0, got shape {arr.shape}")
    T = arr.shape[0] - 1
    if T > arr.shape[1]:
        raise ValueError(f"accuracy matrix has {arr.shape[0]} rows but only {arr.shape[1]} task columns")
    return arr, T


def _mean(values: list[float]) -> float | None:
    """Mean, or None when there is nothing to average or an entry is missing."""
    if not values or any(math.isnan(v) for v in values):
        return None
    return float(np.mean(values))


def final_average_accuracy(A: ArrayLike) -> float | None:
    """Mean over i of A[T][i]: how good the final model is on everything it was trained on."""
    arr, T = _as_matrix(A)
    return _mean([arr[T, i] for i in range(T)])


def average_incremental_accuracy(A: ArrayLike) -> float | None:
    """Mean over j = 1..T of (mean over i <= j of A[j][i]): accuracy on the tasks seen so far, averaged over time."""
    arr, T = _as_matrix(A)
    stages = [_mean([arr[j, i] for i in range(j)]) for j in range(1, T + 1)]
    return _mean([math.nan if s is None else s for s in stages])


def forgetting(A: ArrayLike) -> float | None:
    """Mean over i < T of (max over j in [i, T−1] of A[j][i] − A[T][i]); positive means forgotten."""
    arr, T = _as_matrix(A)
    if T < 2:
        return None
    drops = []
    for i in range(1, T):
        best = [arr[j, i - 1] for j in range(i, T)]
        if any(math.isnan(b) for b in best):
            return None
        drops.append(max(best) - arr[T, i - 1])
    return _mean(drops)


def backward_transfer(A: ArrayLike) -> float | None:
    """Mean over i < T of (A[T][i] − A[i][i]); negative means later tasks hurt earlier ones."""
    arr, T = _as_matrix(A)
    if T < 2:
        return None
    return _mean([arr[T, i - 1] - arr[i, i - 1] for i in range(1, T)])


def forward_transfer(A: ArrayLike) -> float | None:
    """Mean over i = 2..T of (A[i−1][i] − A[0][i]): gain on a task from the tasks before it, before training on it."""
    arr, T = _as_matrix(A)
    if T < 2:
        return None
    return _mean([arr[i - 1, i - 1] - arr[0, i - 1] for i in range(2, T + 1)])


def plasticity(A: ArrayLike) -> float | None:
    """Mean over i of A[i][i]: how well each task is learned right after training on it."""
    arr, T = _as_matrix(A)
    return _mean([arr[i, i - 1] for i in range(1, T + 1)])


def retention_drop(Rret: ArrayLike, names: Sequence[str]) -> dict[str, float | None]:
    """Per retention task, initial minus final score (positive = lost), plus their ``"mean"``.

    ``Rret`` has one row per evaluation (as ``A``) and one column per name; the final row is the last one.
    """
    if "mean" in names:
        raise ValueError("a retention task is named 'mean', which clashes with the summary key; rename the task")
    arr = _to_array(Rret).reshape(len(Rret), len(names))
    T = arr.shape[0] - 1
    out: dict[str, float | None] = {}
    for k, name in enumerate(names):
        drop = arr[0, k] - arr[T, k]
        out[name] = None if math.isnan(drop) else float(drop)
    out["mean"] = _mean([math.nan if v is None else v for v in out.values()])
    return out


def _harmonic_mean(scores: np.ndarray) -> float:
    floored = np.where(np.isnan(scores) | (scores <= 0), _HM_FLOOR, scores)
    return float(len(floored) / np.sum(1.0 / floored))


def linguistic_forgetting(base_scores: Sequence[float], current_scores: Sequence[float]) -> float | None:
    """P1's linguistic forgetting: HM(base) − HM(current) over the language tasks.

    Zeros and missing (NaN) scores are replaced by 1e-3 first, so one collapsed benchmark drags the harmonic
    mean to near zero instead of making it undefined. None when there are no language tasks.
    """
    base = np.array([math.nan if v is None else v for v in base_scores], dtype=float)
    cur = np.array([math.nan if v is None else v for v in current_scores], dtype=float)
    if base.shape != cur.shape:
        raise ValueError(f"linguistic_forgetting: {base.size} base scores but {cur.size} current scores")
    if base.size == 0:
        return None
    return _harmonic_mean(base) - _harmonic_mean(cur)


# P1's language benchmarks (lm-evaluation-harness names, as `lm_eval:` columns) and mmcl's probes, by kind.
NLU_TASKS = ("wsc273", "winogrande", "arc_easy", "arc_challenge")
NLG_TASKS = ("lambada_standard", "lambada_openai", "lambada", "triviaqa", "webqs")


def language_kind(name: str) -> str | None:
    """"nlu", "nlg" or None for a retention column: mmcl's probes (probe-nlu, probe-nlg), `lm_eval-` columns of
    P1's benchmarks, and any column whose name starts with "nlu" or "nlg" (a user's own language tasks)."""
    bare = name.removeprefix("probe-").removeprefix("lm_eval-")
    for kind, known in (("nlu", NLU_TASKS), ("nlg", NLG_TASKS)):
        if bare.startswith(kind) or bare in known:
            return kind
    return None


def language_change(Rret: ArrayLike, names: Sequence[str], row: int = -1) -> dict[str, Any] | None:
    """P1's change in language skill between row 0 (the base model) and ``row`` (default: the last), in points:

    ``nlu`` = HM(base NLU scores) − HM(current NLU scores) over the NLU columns, ``nlg`` the same over the NLG
    columns, and ``nl`` the same over all of them together (P1's "NL Δ": the harmonic mean of every language
    benchmark). Positive means skill lost, negative gained (P1's sign; lower is better). Zeros and missing scores
    count as 1e-3, as in ``linguistic_forgetting``. None when no column is a language task (``language_kind``);
    a kind without columns is None.
    """
    arr = _to_array(Rret).reshape(len(Rret), len(names))
    kinds = {k: language_kind(n) for k, n in enumerate(names)}
    cols = {kind: [k for k, v in kinds.items() if v == kind] for kind in ("nlu", "nlg")}
    cols["nl"] = cols["nlu"] + cols["nlg"]
    if not cols["nl"]:
        return None
    current = arr[row]
    out: dict[str, Any] = {kind: _harmonic_mean(arr[0, c]) - _harmonic_mean(current[c]) if c else None
                           for kind, c in cols.items()}
    out["tasks"] = {kind: [names[k] for k in cols[kind]] for kind in ("nlu", "nlg")}
    return out


def compute_metrics(matrix: dict, *, source: str = "matrix.json") -> dict[str, Any]:
    """All metrics of a parsed ``matrix.json`` as the ``metrics.json`` dict (validates it first)."""
    A, Rret, _, retention = matrix_from_json(matrix, source=source)
    T = A.shape[0] - 1
    drops = retention_drop(Rret, retention)
    mean_drop = drops.pop("mean")
    language = _language_change_rows(Rret, retention)
    return {
        "final_average_accuracy": final_average_accuracy(A),
        "average_incremental_accuracy": average_incremental_accuracy(A),
        "forgetting": forgetting(A),
        "backward_transfer": backward_transfer(A),
        "forward_transfer": forward_transfer(A),
        "plasticity": plasticity(A),
        "retention_drop": {"per_task": drops, "mean": mean_drop},
        "linguistic_forgetting": linguistic_forgetting(Rret[0], Rret[T]) if retention else None,
        **({"language_change": language} if language is not None else {}),  # only with language columns
        "num_tasks_trained": T,
    }


def _language_change_rows(Rret: np.ndarray, retention: list[str]) -> dict[str, Any] | None:
    """``language_change`` after the last row, plus its ``nlu``/``nlg``/``nl`` after every row (P1's continual
    table reports NL Δ after each stage)."""
    final = language_change(Rret, retention) if retention else None
    if final is None:
        return None
    rows = [language_change(Rret, retention, j) for j in range(1, Rret.shape[0])]
    final["per_row"] = [{k: r[k] for k in ("nlu", "nlg", "nl")} for r in rows if r is not None]
    return final
