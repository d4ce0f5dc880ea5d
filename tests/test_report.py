"""The run report from a hand-made run directory: files, PNGs, content, robustness to missing inputs."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmcl.eval.metrics import compute_metrics
from mmcl.report import comparison_table, comparison_text, plot_curves, plot_matrix, summary_table, write_report

MATRIX = {
    "tasks": ["colour_qa", "counting", "ocr"],
    "retention": ["lang_arith"],
    "rows": [
        {"after": None, "scores": {"colour_qa": 10.0, "counting": 12.0, "ocr": 5.0, "lang_arith": 80.0}},
        {"after": "colour_qa", "scores": {"colour_qa": 90.0, "counting": 20.0, "ocr": 6.0, "lang_arith": 75.0}},
        {"after": "counting", "scores": {"colour_qa": 70.0, "counting": 85.0, "ocr": 8.0, "lang_arith": 72.0}},
        {"after": "ocr", "scores": {"colour_qa": 60.0, "counting": 65.0, "ocr": 95.0, "lang_arith": 68.0}},
    ],
}
# By hand: final (60 + 65 + 95)/3 = 73.33; forgetting ((90 − 60) + (85 − 65))/2 = 25.00;
# plasticity (90 + 85 + 95)/3 = 90.00; retention drop 80 − 68 = 12.00.

COST = {
    "wall_time_s": 3725.0,
    "train_time_s": 3000.0,
    "eval_time_s": 700.0,
    "steps": 1200,
    "time_per_step_s": 0.25,
    "samples_per_s": 64.0,
    "peak_memory_bytes": 3 * 2**30,
    "trainable_parameters": 4_194_304,
    "total_parameters": 1_000_000_000,
    "extra_state_bytes": 2**21,
}


def _record(task: str, k: int, correct: bool) -> dict:
    return {
        "id": f"{task}-{k}",
        "prompt": "<image>\nWhat colour is the shape?",
        "prediction": "red" if correct else f"blue{k}",
        "references": ["red"],
        "score": 100.0 if correct else 0.0,
    }


def _run_dir(tmp_path: Path, *, cost: dict | None = COST, metrics: bool = True) -> Path:
    run = tmp_path / "run-seq"
    run.mkdir()
    (run / "matrix.json").write_text(json.dumps(MATRIX))
    if metrics:
        (run / "metrics.json").write_text(json.dumps(compute_metrics(MATRIX)))
    if cost is not None:
        (run / "cost.json").write_text(json.dumps(cost))
    (run / "config.yaml").write_text("model:\n  name: tiny\nstrategies: [lora]\nstream: synth3\nseed: 7\nlr: 0.001\n")
    for row in ("row-00", "row-03"):
        pred_dir = run / "predictions" / row
        pred_dir.mkdir(parents=True)
        for task in MATRIX["tasks"]:
            lines = [json.dumps(_record(task, k, k % 3 == 0)) for k in range(6)]
            (pred_dir / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_write_report_files_and_content(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    report = write_report(run)
    assert report == run / "report.md"
    for png in ("matrix.png", "curves.png"):
        with Image.open(run / "plots" / png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    md = report.read_text()
    # metric values, formatted
    for value in ("73.33", "25.00", "90.00", "12.00"):
        assert value in md
    assert "Final average accuracy 73.3; tasks forgot 25.0 points on average from their best" in md
    assert "language retention dropped 12.0 points" in md
    # the heatmap's row labels appear in the per-task table and the plots are linked
    assert "![accuracy matrix heatmap](plots/matrix.png)" in md
    # ... and the matrix as numbers, one row per evaluation, retention columns marked
    assert "| row | colour_qa | counting | ocr | lang_arith (ret.) |" in md
    assert "| initial | 10.0 | 12.0 | 5.0 | 80.0 |" in md and "| after counting | 70.0 | 85.0 | 8.0 | 72.0 |" in md
    for label in ("after colour_qa", "after counting", "after ocr"):
        assert label in md
    # cost section
    assert "1h 02m 05s" in md and "250.0 ms" in md and "3,072 MiB" in md and "4,194,304 (4.19M)" in md
    # example predictions from the final row (row-03), incorrect and correct
    assert "Example predictions (row-03)" in md
    assert "| colour_qa-1 | What colour is the shape? | blue1 | red | 0.0 | ✗ incorrect |" in md
    assert "| ocr-0 | What colour is the shape? | red | red | 100.0 | ✓ correct |" in md
    # config excerpt: the chosen keys, not the others
    assert "stream: synth3" in md and "seed: 7" in md and "lr:" not in md


def test_html_is_self_contained(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    write_report(run)
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "plots/" not in page  # no external file references
    assert "<table>" in page and "73.33" in page and "colour_qa-1" in page


def test_report_is_deterministic(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    write_report(run)
    first = {p.name: p.read_bytes() for p in [*(run / "plots").glob("*.png"), run / "report.md", run / "report.html"]}
    write_report(run)
    second = {p.name: p.read_bytes() for p in [*(run / "plots").glob("*.png"), run / "report.md", run / "report.html"]}
    assert first == second


def test_missing_cost_keys_and_files(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, cost={"wall_time_s": 42.0, "peak_memory_bytes": None}, metrics=False)
    md = write_report(run).read_text()
    assert "42.0 s" in md and "peak memory" not in md
    assert "25.00" in md  # metrics recomputed from the matrix when metrics.json is absent

    (run / "cost.json").write_text("{}")
    assert "records none of the known cost fields" in write_report(run).read_text()

    (run / "cost.json").unlink()
    assert "No cost.json" in write_report(run).read_text()


def test_partial_run_without_predictions_or_retention(tmp_path: Path) -> None:
    run = tmp_path / "partial"
    run.mkdir()
    rows = [
        {"after": None, "scores": {"t1": 10.0, "t2": 20.0}},  # t3 missing → shown as a gap
        {"after": "t1", "scores": {"t1": 80.0, "t2": 30.0, "t3": 40.0}},
    ]
    matrix = {"tasks": ["t1", "t2", "t3"], "rows": rows}
    (run / "matrix.json").write_text(json.dumps(matrix))
    md = write_report(run).read_text()
    assert "Trained 1 of 3 tasks (t1) (run in progress or stopped early: 2 still to train)" in md
    assert "not yet" in md and "Example predictions" not in md and "Retention" not in md
    with Image.open(run / "plots" / "matrix.png") as img:
        img.verify()


def test_invalid_matrix_names_the_file(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    run.mkdir()
    (run / "matrix.json").write_text(json.dumps({"tasks": ["t1"], "rows": [{"after": "t1", "scores": {}}]}))
    with pytest.raises(ValueError, match=r"bad/matrix.json: rows\[0\].after"):
        write_report(run)
    with pytest.raises(FileNotFoundError, match="no accuracy matrix"):
        write_report(tmp_path)


def test_plots_for_twelve_tasks(tmp_path: Path) -> None:
    tasks = [f"task_{k:02d}" for k in range(12)]
    rows = [{"after": None if j == 0 else tasks[j - 1], "scores": {t: float((7 * j + 3 * i) % 100)
             for i, t in enumerate(tasks)}} for j in range(13)]  # fmt: skip
    matrix = {"tasks": tasks, "retention": ["lang_a", "lang_b"], "rows": rows}
    plot_matrix(matrix, tmp_path / "m.png")
    plot_curves(matrix, tmp_path / "c.png")
    for name in ("m.png", "c.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size[0] >= 1000  # wide enough for 14 labelled columns


def test_summary_table_explains_metrics() -> None:
    table = summary_table(compute_metrics(MATRIX))
    assert table.splitlines()[0] == "| metric | value | what it means |"
    assert "| forgetting | 25.00 | mean drop from each task's best score" in table
    assert "lower is better" in table
    assert "| tasks trained | 3 |" in table
    assert "| backward transfer | -25.00 |" in table  # (60 − 90 + 65 − 85)/2


def test_summary_table_shows_missing_as_na() -> None:
    rows = [{"after": None, "scores": {}}, {"after": "t1", "scores": {}}]
    metrics = compute_metrics({"tasks": ["t1"], "rows": rows})
    assert "| forgetting | n/a |" in summary_table(metrics)


def test_comparison_table_one_row_per_label() -> None:
    seq = compute_metrics(MATRIX)
    joint = dict(seq, final_average_accuracy=88.0, forgetting=1.5)
    runs = {"sequential": seq, "joint": joint, "ewc": dict(seq, forgetting=None)}
    table = comparison_table(runs)
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, one row per run
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["sequential", "joint", "ewc"]
    assert "**88.00**" in lines[3] and "**1.50**" in lines[3]  # best final accuracy and lowest forgetting
    assert "n/a" in lines[4]
    text = comparison_text(runs)
    assert len(text.splitlines()) == 2 + 3 and "88.00*" in text and "|" not in text
