"""Continual metrics against small matrices worked out by hand (1-based tasks i, rows j = 0..T)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmcl.eval.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    compute_metrics,
    final_average_accuracy,
    forgetting,
    forward_transfer,
    linguistic_forgetting,
    load_matrix,
    matrix_from_json,
    plasticity,
    retention_drop,
)

#                  t1  t2  t3
A3 = np.array([
    [10, 20, 30],  # row 0: before training
    [80, 25, 35],  # after t1
    [60, 90, 40],  # after t2
    [50, 70, 85],  # after t3
], dtype=float)  # fmt: skip

# Non-monotone: t1 peaks after t2 (not on the diagonal), t2 keeps improving after t3.
NM = np.array([
    [0, 0, 0],
    [40, 10, 5],
    [70, 50, 5],
    [55, 60, 90],
], dtype=float)  # fmt: skip


def _matrix_json(A: np.ndarray, tasks: list[str], retention: dict[str, list[float]] | None = None) -> dict:
    retention = retention or {}
    rows = []
    for j, row in enumerate(A):
        scores = {t: float(v) for t, v in zip(tasks, row) if not math.isnan(v)}
        scores.update({name: vals[j] for name, vals in retention.items()})
        rows.append({"after": None if j == 0 else tasks[j - 1], "scores": scores})
    return {"tasks": tasks, "retention": list(retention), "rows": rows}


# ------------------------------------------------------------------------------------------- full matrices


def test_three_task_matrix() -> None:
    # final: (50 + 70 + 85) / 3 = 205/3
    assert final_average_accuracy(A3) == pytest.approx(205 / 3)
    # AIA: j=1: 80; j=2: (60 + 90)/2 = 75; j=3: 205/3 → (80 + 75 + 205/3) / 3 = 670/9
    assert average_incremental_accuracy(A3) == pytest.approx(670 / 9)
    # forgetting: t1: max(80, 60) − 50 = 30; t2: max(90) − 70 = 20 → 25
    assert forgetting(A3) == pytest.approx(25.0)
    # BWT: t1: 50 − 80 = −30; t2: 70 − 90 = −20 → −25
    assert backward_transfer(A3) == pytest.approx(-25.0)
    # FWT: t2: A[1][2] − A[0][2] = 25 − 20 = 5; t3: A[2][3] − A[0][3] = 40 − 30 = 10 → 7.5
    assert forward_transfer(A3) == pytest.approx(7.5)
    # plasticity: (80 + 90 + 85) / 3 = 85
    assert plasticity(A3) == pytest.approx(85.0)


def test_non_monotone_matrix() -> None:
    # forgetting: t1: max(A[1][1]=40, A[2][1]=70) = 70 (not the diagonal) − 55 = 15;
    #             t2: max(A[2][2]=50) − 60 = −10 (it improved) → (15 − 10)/2 = 2.5
    assert forgetting(NM) == pytest.approx(2.5)
    # BWT: t1: 55 − 40 = 15; t2: 60 − 50 = 10 → 12.5 (positive: later tasks helped)
    assert backward_transfer(NM) == pytest.approx(12.5)
    # FWT: t2: 10 − 0; t3: 5 − 0 → 7.5
    assert forward_transfer(NM) == pytest.approx(7.5)
    # plasticity: (40 + 50 + 90)/3 = 60; final: (55 + 60 + 90)/3 = 205/3
    assert plasticity(NM) == pytest.approx(60.0)
    assert final_average_accuracy(NM) == pytest.approx(205 / 3)
    # AIA: 40; (70 + 50)/2 = 60; 205/3 → (40 + 60 + 205/3)/3 = 505/9
    assert average_incremental_accuracy(NM) == pytest.approx(505 / 9)


def test_partial_matrix_uses_trained_tasks_only() -> None:
    partial = A3[:3]  # 2 of 3 tasks trained: T = 2; column t3 is only read by nothing (FWT needs i <= T)
    # final (60 + 90)/2 = 75; AIA (80 + 75)/2 = 77.5; forgetting t1: 80 − 60 = 20; BWT 60 − 80 = −20;
    # FWT t2: 25 − 20 = 5; plasticity (80 + 90)/2 = 85
    assert final_average_accuracy(partial) == pytest.approx(75.0)
    assert average_incremental_accuracy(partial) == pytest.approx(77.5)
    assert forgetting(partial) == pytest.approx(20.0)
    assert backward_transfer(partial) == pytest.approx(-20.0)
    assert forward_transfer(partial) == pytest.approx(5.0)
    assert plasticity(partial) == pytest.approx(85.0)
    changed = partial.copy()
    changed[:, 2] = [0, 0, 0]  # the untrained task's column does not matter
    assert final_average_accuracy(changed) == final_average_accuracy(partial)
    assert forward_transfer(changed) == forward_transfer(partial)


def test_missing_upper_triangle_only_breaks_forward_transfer() -> None:
    upper = A3.copy()
    upper[np.triu_indices(4, k=0, m=3)] = np.nan  # A[j][i] with i > j: all of row 0, (1,t2), (1,t3), (2,t3)
    assert np.isnan(upper[0]).all() and not np.isnan(upper[1, 0])
    assert forward_transfer(upper) is None
    assert final_average_accuracy(upper) == pytest.approx(205 / 3)
    assert average_incremental_accuracy(upper) == pytest.approx(670 / 9)
    assert forgetting(upper) == pytest.approx(25.0)
    assert backward_transfer(upper) == pytest.approx(-25.0)
    assert plasticity(upper) == pytest.approx(85.0)


def test_missing_needed_entry_gives_none() -> None:
    holed = A3.copy()
    holed[2, 0] = np.nan  # A[2][1]: inside forgetting's max range and AIA's stage 2
    assert forgetting(holed) is None
    assert average_incremental_accuracy(holed) is None
    assert backward_transfer(holed) == pytest.approx(-25.0)  # uses A[1][1], A[3][1]: still fine


def test_single_task_has_no_transfer_or_forgetting() -> None:
    one = A3[:2]  # T = 1
    assert forgetting(one) is None
    assert backward_transfer(one) is None
    assert forward_transfer(one) is None
    assert final_average_accuracy(one) == pytest.approx(80.0)
    assert plasticity(one) == pytest.approx(80.0)
    assert average_incremental_accuracy(one) == pytest.approx(80.0)


def test_no_task_trained_yet() -> None:
    zero = A3[:1]  # only row 0
    assert final_average_accuracy(zero) is None
    assert plasticity(zero) is None
    assert average_incremental_accuracy(zero) is None


def test_accepts_python_lists_with_none() -> None:
    rows = [[None, None], [80, None], [60, 90]]
    assert final_average_accuracy(rows) == pytest.approx(75.0)
    assert forward_transfer(rows) is None  # needs A[1][2] and A[0][2]


def test_too_many_rows_raises() -> None:
    with pytest.raises(ValueError, match="3 rows but only 1 task columns"):
        final_average_accuracy([[1.0], [2.0], [3.0]])


# --------------------------------------------------------------------------------------------- retention


def test_retention_drop() -> None:
    # lang_a: 80 → 60: drop 20; lang_b: 40 → 0: drop 40; mean 30. The middle row is ignored.
    R = [[80, 40], [70, 30], [60, 0]]
    assert retention_drop(R, ["lang_a", "lang_b"]) == pytest.approx({"lang_a": 20.0, "lang_b": 40.0, "mean": 30.0})


def test_retention_drop_missing_score() -> None:
    out = retention_drop([[80, None], [60, 10]], ["lang_a", "lang_b"])
    assert out == {"lang_a": 20.0, "lang_b": None, "mean": None}


def test_linguistic_forgetting_zero_rule() -> None:
    # base HM: 2 / (1/80 + 1/40) = 2 / (3/80) = 160/3 ≈ 53.333
    # current [60, 0] → [60, 1e-3]: HM = 2 / (1/60 + 1000) ≈ 0.0019999667
    expected = 160 / 3 - 2 / (1 / 60 + 1000)
    assert linguistic_forgetting([80, 40], [60, 0]) == pytest.approx(expected)
    assert expected == pytest.approx(53.33133, abs=1e-5)


def test_linguistic_forgetting_nan_and_empty() -> None:
    # NaN is floored like zero: HM([1e-3]) = 1e-3 → 50 − 0.001
    assert linguistic_forgetting([50.0], [math.nan]) == pytest.approx(49.999)
    assert linguistic_forgetting([], []) is None


# ------------------------------------------------------------------------------------ compute_metrics


def test_compute_metrics_keys_and_values() -> None:
    m = compute_metrics(_matrix_json(A3, ["t1", "t2", "t3"], {"lang_a": [80, 75, 70, 60], "lang_b": [40, 30, 20, 0]}))
    assert list(m) == [
        "final_average_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "backward_transfer",
        "forward_transfer",
        "plasticity",
        "retention_drop",
        "linguistic_forgetting",
        "num_tasks_trained",
    ]
    assert m["num_tasks_trained"] == 3
    assert m["forgetting"] == pytest.approx(25.0)
    assert m["retention_drop"] == {"per_task": {"lang_a": 20.0, "lang_b": 40.0}, "mean": 30.0}
    assert m["linguistic_forgetting"] == pytest.approx(160 / 3 - 2 / (1 / 60 + 1000))
    json.dumps(m)  # metrics.json must be serialisable (plain floats, None)


def test_compute_metrics_without_retention() -> None:
    m = compute_metrics(_matrix_json(A3[:3], ["t1", "t2", "t3"]))
    assert m["num_tasks_trained"] == 2
    assert m["linguistic_forgetting"] is None
    assert m["retention_drop"] == {"per_task": {}, "mean": None}
    assert m["final_average_accuracy"] == pytest.approx(75.0)


# ---------------------------------------------------------------------------------------------- validation


def _good() -> dict:
    return _matrix_json(A3, ["t1", "t2", "t3"], {"lang_a": [80, 75, 70, 60]})


def test_matrix_from_json_roundtrip() -> None:
    A, R, tasks, retention = matrix_from_json(_good())
    np.testing.assert_array_equal(A, A3)
    np.testing.assert_array_equal(R, [[80], [75], [70], [60]])
    assert tasks == ["t1", "t2", "t3"] and retention == ["lang_a"]


def test_missing_scores_become_nan() -> None:
    obj = _good()
    del obj["rows"][0]["scores"]["t3"]
    A, *_ = matrix_from_json(obj)
    assert math.isnan(A[0, 2])


def test_retention_key_is_optional() -> None:
    obj = _matrix_json(A3, ["t1", "t2", "t3"])
    del obj["retention"]
    _, R, _, retention = matrix_from_json(obj)
    assert R.shape == (4, 0) and retention == []


def _broken(mutate) -> dict:
    obj = _good()
    mutate(obj)
    return obj


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("tasks"), r"run7/matrix.json: tasks: missing required key"),
        (lambda o: o["rows"][2].update(after="t3"), r"run7/matrix.json: rows\[2\].after: expected 't2', got 't3'; "),
        (lambda o: o["rows"][0].update(after="t1"), r"rows\[0\].after: expected None, got 't1'; row 0 is the model"),
        (lambda o: o["rows"][1]["scores"].update(t1="high"), r"rows\[1\].scores.t1: expected a finite number, got"),
        (lambda o: o["rows"][1]["scores"].update(t1=math.inf), r"rows\[1\].scores.t1: expected a finite number"),
        (lambda o: o["rows"][1]["scores"].update(t1=True), r"rows\[1\].scores.t1: expected a finite number"),
        (lambda o: o["rows"][3]["scores"].update(t4=1.0), r"rows\[3\].scores.t4: not a task in 'tasks' or 'retent"),
        (lambda o: o["rows"].append({"after": "t4", "scores": {}}), r"rows: 5 rows for 3 tasks"),
        (lambda o: o["rows"][1].pop("scores"), r"rows\[1\]: expected an object with keys 'after' and 'scores'"),
        (lambda o: o.update(rows=[]), r"rows: expected a non-empty list"),
        (lambda o: o.update(tasks=["t1", "t1", "t3"]), r"tasks: duplicate task names \['t1'\]"),
        (lambda o: o.update(retention=["t1"]), r"retention: \['t1'\] also listed in 'tasks'"),
    ],
)
def test_validation_errors_name_file_and_path(mutate, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        matrix_from_json(_broken(mutate), source="run7/matrix.json")


def test_load_matrix(tmp_path: Path) -> None:
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(_good(), indent=2))
    A, *_ = load_matrix(path)
    np.testing.assert_array_equal(A, A3)


def test_load_matrix_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "matrix.json"
    path.write_text('{\n  "tasks": ["t1"],\n  "rows": [,]\n}\n')
    with pytest.raises(ValueError, match=r"matrix.json:3:\d+: invalid JSON"):
        load_matrix(path)


def test_load_matrix_validation_names_path(tmp_path: Path) -> None:
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps({"tasks": ["t1"], "rows": [{"after": "t1", "scores": {}}]}))
    with pytest.raises(ValueError, match=r"matrix.json: rows\[0\].after: expected None"):
        load_matrix(path)
