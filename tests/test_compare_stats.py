"""`mmcl compare`'s statistics: the batch metrics against `mmcl.eval.metrics`, bootstrap intervals on small cases
whose resampling distribution is worked out by hand, the paired test marking significant / not significant on
constructed cases, the single-task share, and the summary read from run directories written as the engine writes
them (matrix.json, predictions/row-NN/TASK.jsonl with per-record scores, cost.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmcl.cli import main
from mmcl.compare import CompareError, summarise
from mmcl.eval import bootstrap as bs
from mmcl.eval.metrics import compute_metrics
from mmcl.report.tables import comparison_report

# ------------------------------------------------------------------------------------------ batch metrics


def _matrix_json(A: np.ndarray, R: np.ndarray, tasks: list[str], retention: list[str]) -> dict:
    rows = [{"after": None if j == 0 else tasks[j - 1],
             "scores": {**dict(zip(tasks, map(float, A[j]))), **dict(zip(retention, map(float, R[j])))}}
            for j in range(A.shape[0])]
    return {"tasks": tasks, "retention": retention, "rows": rows}


@pytest.mark.parametrize("T, K, language", [(1, 0, False), (2, 1, False), (3, 2, False), (5, 3, False),
                                             (2, 3, True), (3, 2, True)])
def test_batch_metrics_equal_the_reference_metrics(T, K, language):
    """One formula, two forms: the vectorised metrics equal `compute_metrics` on every matrix of a batch."""
    rng = np.random.default_rng(T * 10 + K)
    A = rng.uniform(0, 100, size=(4, T + 1, T))
    R = rng.uniform(0, 100, size=(4, T + 1, K))
    R[0, 0, :] = 0.0  # a zero retention score: floored at 0.001 in the harmonic mean
    tasks = [f"t{i}" for i in range(T)]
    retention = (["probe-nlu", "probe-nlg", "nlu_mine"][:K] if language else [f"r{k}" for k in range(K)])
    out = bs.batch_metrics(A, R, retention)
    for b in range(4):
        ref = compute_metrics(_matrix_json(A[b], R[b], tasks, retention))
        ref["retention_drop"] = ref["retention_drop"]["mean"]
        change = ref.get("language_change") or {}
        ref["nlu_change"], ref["nlg_change"] = change.get("nlu"), change.get("nlg")
        for key in bs.METRIC_KEYS:
            if ref[key] is None:
                assert np.isnan(out[key][b]), key
            else:
                assert out[key][b] == pytest.approx(ref[key], abs=1e-9), key


def test_batch_metrics_hand_worked():
    #               t1  t2
    A = np.array([[10, 20],   # before training
                  [80, 30],   # after t1
                  [50, 90]])  # after t2
    m = bs.batch_metrics(A, np.zeros((3, 0)))
    assert m["final_average_accuracy"] == 70  # (50 + 90) / 2
    assert m["average_incremental_accuracy"] == 75  # (80 + 70) / 2
    assert m["forgetting"] == 30  # 80 - 50
    assert m["backward_transfer"] == -30
    assert m["forward_transfer"] == 10  # A[1][2] - A[0][2] = 30 - 20
    assert m["plasticity"] == 85  # (80 + 90) / 2
    assert np.isnan(m["retention_drop"]) and np.isnan(m["linguistic_forgetting"])
    assert np.isnan(m["nlu_change"]) and np.isnan(m["nlg_change"])
    with pytest.raises(ValueError, match="complete matrices"):
        bs.batch_metrics(A[:2], np.zeros((2, 0)))


def test_batch_metrics_language_change_hand_worked():
    """P1's NLU / NLG change: harmonic mean of the base row minus that of the last row, per kind of column."""
    A = np.array([[0.0], [50.0]])
    #              nlu_a  nlg   nlu_b
    R = np.array([[80.0, 50.0, 20.0],   # base model
                  [60.0, 40.0, 20.0]])  # after the task
    m = bs.batch_metrics(A, R, ["probe-nlu", "probe-nlg", "lm_eval-arc_easy"])
    assert m["nlu_change"] == pytest.approx(32.0 - 30.0)  # HM(80, 20) = 2/(1/80 + 1/20) = 32; HM(60, 20) = 30
    assert m["nlg_change"] == pytest.approx(10.0)  # 50 - 40
    # P1's NL change over all three: 3/(1/80 + 1/50 + 1/20) = 36.364 minus 3/(1/60 + 1/40 + 1/20) = 32.727
    assert m["linguistic_forgetting"] == pytest.approx(400 / 11 - 360 / 11)


# ---------------------------------------------------------------------------------------------- bootstrap


def _one_task(scores_per_seed: list[list[float]]) -> bs.RunSet:
    """One trained task; row 0 scores 0 everywhere, row 1 the given per-record scores of each seed."""
    X = np.array(scores_per_seed, dtype=float)
    return bs.RunSet(["t"], [], {"t": np.stack([np.zeros_like(X), X], axis=1)})


def test_bootstrap_over_records_matches_the_exact_resampling_distribution():
    """One seed, two records scored 0 and 100: a resample's mean is 0, 50 or 100 with probability 1/4, 1/2, 1/4,
    so the 95 % percentile interval is [0, 100] and about half the resamples give 50."""
    draws = bs.draw(1, {"t": 2}, resamples=4000, seed=0)
    final = bs.metric_samples([_one_task([[0, 100]])], draws)["final_average_accuracy"]
    assert set(np.unique(final)) == {0.0, 50.0, 100.0}
    assert np.mean(final == 50) == pytest.approx(0.5, abs=0.03)  # 4 binomial sd (sd = 0.0079)
    assert np.mean(final == 0) == pytest.approx(0.25, abs=0.03)
    assert bs.interval(final) == (0.0, 100.0)


def test_bootstrap_over_seeds_matches_the_exact_resampling_distribution():
    """Two seeds whose records all score 40 and 60: the mean of two drawn seeds is 40, 50 or 60 (1/4, 1/2, 1/4)."""
    draws = bs.draw(2, {"t": 3}, resamples=4000, seed=1)
    final = bs.metric_samples([_one_task([[40, 40, 40], [60, 60, 60]])], draws)["final_average_accuracy"]
    assert set(np.unique(final)) == {40.0, 50.0, 60.0}
    assert np.mean(final == 50) == pytest.approx(0.5, abs=0.03)
    assert bs.interval(final) == (40.0, 60.0)


def test_bootstrap_interval_collapses_when_nothing_varies_and_brackets_a_binomial_mean():
    same = bs.metric_samples([_one_task([[70] * 5, [70] * 5])], bs.draw(2, {"t": 5}, 500))
    assert bs.interval(same["final_average_accuracy"]) == (70.0, 70.0)
    # 100 records, 30 correct, one seed: the resampled mean is 100 * Binomial(100, 0.3) / 100, whose 2.5 % and
    # 97.5 % quantiles are 21 and 39: the percentile interval lies within one record of them
    scores = [100.0] * 30 + [0.0] * 70
    lo, hi = bs.interval(bs.metric_samples([_one_task([scores])], bs.draw(1, {"t": 100}, 4000))
                         ["final_average_accuracy"])
    assert 20 <= lo <= 22 and 38 <= hi <= 40


def test_draws_are_reproducible_and_independent_of_other_tasks():
    a, b = bs.draw(3, {"x": 4, "y": 5}, 50, seed=7), bs.draw(3, {"x": 4, "y": 5}, 50, seed=7)
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.weights["y"], b.weights["y"])
    assert not np.array_equal(a.seeds, bs.draw(3, {"x": 4, "y": 5}, 50, seed=8).seeds)
    w = a.weights["x"]
    assert w.shape == (50, 3, 4) and np.allclose(w.sum(-1), 1.0) and np.allclose(w * 4, np.round(w * 4))
    assert bs.interval(np.array([1.0, np.nan])) is None


# ------------------------------------------------------------------------------- run directories on disk


def write_run(run_dir: Path, scores: dict[str, np.ndarray], tasks: list[str], retention: list[str] = (),
              reverse_records: bool = False) -> Path:
    """A run directory as the engine writes it: scores[task] is (rows, records), record k has id `task-k`."""
    J = len(tasks) + 1
    rows = []
    for j in range(J):
        out = run_dir / "predictions" / f"row-{j:02d}"
        out.mkdir(parents=True, exist_ok=True)
        for t in [*tasks, *retention]:
            order = range(scores[t].shape[1])
            lines = [json.dumps({"id": f"{t}-{k}", "prompt": "q", "prediction": "a", "references": ["a"],
                                 "score": float(scores[t][j, k])})
                     for k in (reversed(order) if reverse_records else order)]
            (out / f"{t}.jsonl").write_text("\n".join(lines) + "\n")
        rows.append({"after": None if j == 0 else tasks[j - 1],
                     "scores": {t: round(float(scores[t][j].mean()), 4) for t in [*tasks, *retention]}})
    (run_dir / "matrix.json").write_text(json.dumps({"tasks": tasks, "retention": list(retention), "rows": rows}))
    (run_dir / "cost.json").write_text(json.dumps({"time_per_step_s": 0.1, "peak_memory_bytes": 2**20,
                                                   "trainable_parameters": 10, "extra_state_bytes": 0}))
    return run_dir


def _binary(n: int, correct: list[int]) -> np.ndarray:
    x = np.zeros(n)
    x[correct] = 100.0
    return x


def _two_task_run(root: Path, name: str, t1_final: np.ndarray, reverse: bool = False) -> Path:
    """Two tasks of 20 records; only task t1's final row differs between the constructed methods."""
    n = 20
    learned = _binary(n, list(range(15)))
    t1 = np.stack([np.zeros(n), learned, t1_final])
    t2 = np.stack([np.zeros(n), np.zeros(n), learned])
    return write_run(root / name, {"t1": t1, "t2": t2}, ["t1", "t2"], reverse_records=reverse)


def test_paired_difference_is_significant_only_when_its_interval_excludes_zero(tmp_path):
    """Methods differ only in t1's final per-record scores (20 records). `better` gets 10 more records right than
    `sequential`: a resample's difference in t1 is 5 x (draws that land on those 10 records), Binomial(20, 1/2)
    x 5, so the interval of the t1 final difference is about [30, 70] (exact quantiles 6 and 14 draws) and excludes
    0. `shuffled` gets 5 records more and 5 others fewer right: its difference is 0 with an interval around it.
    `same` is identical: a difference of 0 in every resample."""
    base = _binary(20, list(range(5)))
    runs = {
        "sequential": _two_task_run(tmp_path, "sequential", base),
        "better": _two_task_run(tmp_path, "better", _binary(20, list(range(15))), reverse=True),
        "shuffled": _two_task_run(tmp_path, "shuffled", _binary(20, list(range(5, 10)))),
        "same": _two_task_run(tmp_path, "same", base.copy()),
    }
    s = summarise({k: [[v]] for k, v in runs.items()}, [0], baseline="sequential", resamples=2000)
    better = s["methods"]["better"]
    # records are matched by id (better's files list them in reverse order), so its final t1 is 75, not scrambled
    assert better["final_per_task"]["t1"]["mean"] == 75.0
    lo, hi = better["vs_baseline"]["final_average_accuracy"]["ci"]
    assert better["vs_baseline"]["final_average_accuracy"]["diff"] == pytest.approx(25.0)  # (75 - 25) / 2 tasks
    assert 12.5 <= lo <= 17.5 and 32.5 <= hi <= 37.5  # half of [30, 70], within one record
    assert better["vs_baseline"]["final_average_accuracy"]["significant"]
    assert better["vs_baseline"]["forgetting"]["significant"] and better["vs_baseline"]["forgetting"]["diff"] < 0
    assert not better["vs_baseline"]["plasticity"]["significant"]  # identical diagonal: 0 in every resample
    assert better["vs_baseline"]["plasticity"]["ci"] == (0.0, 0.0)
    shuffled = s["methods"]["shuffled"]["vs_baseline"]["final_average_accuracy"]
    assert shuffled["diff"] == 0 and shuffled["ci"][0] < 0 < shuffled["ci"][1] and not shuffled["significant"]
    same = s["methods"]["same"]["vs_baseline"]
    assert all(not d["significant"] and d["ci"] == (0.0, 0.0) for k, d in same.items() if d["diff"] is not None)
    assert "vs_baseline" not in s["methods"]["sequential"]


def test_pairing_over_records_detects_what_independent_intervals_cannot(tmp_path):
    """`better`'s own interval overlaps `sequential`'s, yet the paired difference is significant: both methods
    see the same resampled records, so the records both get right or wrong cancel."""
    n = 40
    base = _binary(n, list(range(0, 40, 2)))  # 20 of 40 right
    plus = base.copy()
    plus[[1, 3, 5, 7]] = 100.0  # 4 more right, nothing lost
    runs = {"sequential": _two_task_run(tmp_path, "seq", base[:20]), "better": _two_task_run(tmp_path, "b", plus[:20])}
    s = summarise({k: [[v]] for k, v in runs.items()}, [0], baseline="sequential", resamples=2000)
    own = [s["methods"][k]["final_per_task"]["t1"]["ci"] for k in ("sequential", "better")]
    assert own[1][0] < own[0][1]  # the two intervals overlap
    assert s["methods"]["better"]["vs_baseline"]["final_average_accuracy"]["significant"]


def test_summary_over_seeds_with_single_task_ceiling_and_share(tmp_path):
    """Two seeds; the single-task runs score t1 80 and t2 60 in every record: a method's final t1 of 40 is a 50 %
    share of the ceiling, with a degenerate interval since nothing varies."""
    n = 4
    runs = {}
    for label, t1_final in (("sequential", 40.0), ("ewc", 60.0)):
        runs[label] = [[write_run(tmp_path / label / f"seed-{s}", {
            "t1": np.array([[0.0] * n, [80.0] * n, [t1_final] * n]),
            "t2": np.array([[0.0] * n, [0.0] * n, [60.0] * n]),
            "r": np.array([[50.0] * n, [40.0] * n, [30.0] * n])}, ["t1", "t2"], ["r"]) for s in (0, 1)]]
    single = {t: [write_run(tmp_path / "single" / t / f"seed-{s}",
                            {t: np.array([[0.0] * n, [score] * n])}, [t]) for s in (0, 1)]
              for t, score in (("t1", 80.0), ("t2", 60.0))}
    s = summarise(runs, [0, 1], baseline="sequential", resamples=300, single=single)
    assert s["single_task"]["ceiling"]["t1"]["mean"] == 80.0 and s["single_task"]["ceiling"]["t1"]["n"] == 2
    seq = s["methods"]["sequential"]
    assert seq["share_of_ceiling"]["t1"] == {"mean": 50.0, "ci": (50.0, 50.0)}
    assert seq["share_of_ceiling"]["t2"]["mean"] == 100.0 and "r" not in seq["share_of_ceiling"]
    assert seq["retention_drop"]["mean"] == 20.0 and seq["final_average_accuracy"]["n"] == 2
    assert s["methods"]["ewc"]["vs_baseline"]["final_average_accuracy"]["diff"] == 10.0
    report = comparison_report(s)
    assert "| single-task ceiling | 80.0 [80.0, 80.0] | 60.0 [60.0, 60.0] |" in report.markdown
    assert "| sequential | 50 % [50, 50] | 100 % [100, 100] | 75 % |" in report.markdown
    assert "## Difference from sequential" in report.markdown and "+10.00 [+10.00, +10.00] *" in report.markdown
    assert "share of the single-task ceiling" in report.text


def test_summary_is_reproducible_and_adding_a_method_keeps_the_others_intervals(tmp_path):
    rng = np.random.default_rng(0)

    def run(name):
        return [[_two_task_run(tmp_path, f"{name}-{s}", _binary(20, list(rng.choice(20, 8, replace=False))))
                 for s in (0, 1, 2)]]

    two = {"sequential": run("seq"), "ewc": run("ewc")}
    a = summarise(two, [0, 1, 2], baseline="sequential", resamples=200)
    b = summarise(two, [0, 1, 2], baseline="sequential", resamples=200)
    assert json.dumps(a) == json.dumps(b)
    c = summarise({**two, "lwf": run("lwf")}, [0, 1, 2], baseline="sequential", resamples=200)
    assert c["methods"]["ewc"] == a["methods"]["ewc"]
    d = summarise(two, [0, 1, 2], baseline="sequential", resamples=200, bootstrap_seed=1)
    assert d["methods"]["ewc"]["final_average_accuracy"]["ci"] != a["methods"]["ewc"]["final_average_accuracy"]["ci"]


def test_runs_that_cannot_be_paired_are_refused_naming_the_file(tmp_path):
    seq = _two_task_run(tmp_path, "seq", _binary(20, [1]))
    other = write_run(tmp_path / "short", {"t1": np.zeros((3, 19)), "t2": np.zeros((3, 19))}, ["t1", "t2"])
    with pytest.raises(CompareError, match=r"short/predictions/row-00/t1.jsonl: its 19 test records differ"):
        summarise({"sequential": [[seq]], "x": [[other]]}, [0], baseline="sequential", resamples=10)
    matrix = json.loads((seq / "matrix.json").read_text())
    matrix["rows"][1]["scores"]["t1"] = 12.5  # the per-record scores no longer give the matrix's score
    (seq / "matrix.json").write_text(json.dumps(matrix))
    with pytest.raises(CompareError, match=r"row-01/t1.jsonl gives 75.0000, but matrix.json says 12.5"):
        summarise({"sequential": [[seq]]}, [0], baseline="sequential", resamples=10)
    (seq / "predictions" / "row-02" / "t2.jsonl").unlink()
    with pytest.raises(CompareError, match=r"row-02/t2.jsonl: per-record scores missing"):
        summarise({"sequential": [[seq]]}, [0], baseline="sequential", resamples=10)


def test_compare_help_documents_the_statistics_and_bad_options_end_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in ("bootstrap", "test records", "--baseline", "--resamples", "--bootstrap-seed", "--single-task",
                   "--single-task-dir", "paired", "significant", "share"):
        assert needle in help_text, needle
    assert main(["compare", "--methods", "sequential", "--seeds", "0,x", "--out", "/nonexistent/x"]) == 2
    assert "error: --seeds: '0,x' must be comma-separated integers" in capsys.readouterr().err
    assert main(["compare", "--methods", "sequential", "--resamples", "0", "--out", "/nonexistent/x"]) == 2
    assert "--resamples: 0 must be >= 1" in capsys.readouterr().err
    assert main(["compare", "--methods", "sequential", "--baseline", "ewc", "--out", "/nonexistent/x"]) == 2
    assert "--baseline 'ewc' is not one of --methods" in capsys.readouterr().err


def test_task_orders_average_each_run_metric_and_share_the_record_draws(tmp_path):
    """Two task orders x two seeds: each metric's mean is the mean of the four runs' own metrics (each run's matrix
    in its own order), and a task's records are resampled alike in both orders (same draws by task name)."""
    rng = np.random.default_rng(3)
    n, runs, expected = 6, [], []
    for k, tasks in enumerate((["a", "b"], ["b", "a"])):
        per_seed = []
        for s in (0, 1):
            scores = {t: rng.choice([0.0, 100.0], size=(3, n)) for t in tasks}
            d = write_run(tmp_path / f"seed-{s}-order-{k}", scores, tasks)
            per_seed.append(d)
            expected.append(compute_metrics(json.loads((d / "matrix.json").read_text())))
        runs.append(per_seed)
    s = summarise({"sequential": runs}, [0, 1], baseline="sequential", resamples=300)["methods"]["sequential"]
    for key in ("final_average_accuracy", "forgetting", "backward_transfer", "forward_transfer", "plasticity"):
        assert s[key]["mean"] == pytest.approx(np.mean([m[key] for m in expected]), abs=1e-3), key
        lo, hi = s[key]["ci"]
        assert s[key]["n"] == 4 and lo - 1e-9 <= s[key]["mean"] <= hi + 1e-9


def test_a_tie_up_to_float_rounding_is_not_significant():
    import numpy as np

    from mmcl.compare import _difference

    rounding = np.full(1000, -1.4e-15)  # two methods with the same scores, a metric recomputed in another order
    assert _difference(-1.4e-15, rounding)["significant"] is False
    assert _difference(0.5, np.full(1000, 0.5))["significant"] is True


# ------------------------------------------------------------------- corpus-level scores (the NLG probe)


def test_ratio_scores_are_the_corpus_statistic_not_the_mean_of_records():
    """Two records of 10 bytes with 10 and 30 nats: the NLG score is 100 * exp(-40 / 20) = 13.53, not the mean of
    the per-record scores (100 e^-1 + 100 e^-3) / 2 = 20.88; a resample holding record 0 twice scores 100 e^-1."""
    X = bs.Ratio(np.array([[[10.0, 30.0]]]), np.array([[[10.0, 10.0]]]), bs.per_byte_score)
    assert bs.task_values(X)[0, 0] == pytest.approx(100 * np.exp(-2.0))
    draws = bs.Draws(np.zeros((2, 1), dtype=int), {"nlg": np.array([[[1.0, 0.0]], [[0.5, 0.5]]])})
    rows = bs._task_rows(X, draws.weights["nlg"], draws.seeds)
    assert rows[:, 0, 0] == pytest.approx([100 * np.exp(-1.0), 100 * np.exp(-2.0)])


def test_summary_reads_the_nlg_probe_as_a_ratio_and_checks_it_against_the_matrix(tmp_path):
    """Predictions that carry `loglik` and `bytes` (the NLG probe) reproduce a matrix score of 100 exp(-NLL/bytes)
    over all records: the summary accepts the run and its final score is that corpus value."""
    run = write_run(tmp_path / "sequential" / "seed-0", {"t1": np.array([[0.0, 0.0], [100.0, 0.0]]),
                                                         "probe-nlg": np.zeros((2, 2))}, ["t1"], ["probe-nlg"])
    nll = {0: [10.0, 30.0], 1: [20.0, 40.0]}  # row -> per-record nats, 10 bytes each
    matrix = json.loads((run / "matrix.json").read_text())
    for j, values in nll.items():
        lines = [json.dumps({"id": f"probe-nlg-{k}", "prompt": "q", "prediction": "nll/byte", "references": ["a"],
                             "score": 100 * np.exp(-v / 10), "loglik": -v, "bytes": 10}) for k, v in enumerate(values)]
        (run / "predictions" / f"row-{j:02d}" / "probe-nlg.jsonl").write_text("\n".join(lines) + "\n")
        matrix["rows"][j]["scores"]["probe-nlg"] = round(100 * np.exp(-sum(values) / 20), 4)
    (run / "matrix.json").write_text(json.dumps(matrix))
    s = summarise({"sequential": [[run]]}, [0], baseline="sequential", resamples=200)
    final = s["methods"]["sequential"]["final_per_task"]["probe-nlg"]["mean"]
    assert final == pytest.approx(100 * np.exp(-3.0))  # (20 + 40) / 20 nats per byte
    assert s["methods"]["sequential"]["nlg_change"]["mean"] == pytest.approx(100 * np.exp(-2.0) - 100 * np.exp(-3.0))
    matrix["rows"][1]["scores"]["probe-nlg"] = round(100 * np.exp(-3.0) / 2 + 100 * np.exp(-4.0) / 2, 4)  # a mean
    (run / "matrix.json").write_text(json.dumps(matrix))
    with pytest.raises(CompareError, match=r"row-01/probe-nlg.jsonl gives 4.9787, but matrix.json says"):
        summarise({"sequential": [[run]]}, [0], baseline="sequential", resamples=50)
