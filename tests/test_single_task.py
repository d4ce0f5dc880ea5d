"""Single-task references end to end on the micro world and model: `mmcl single-task` fine-tunes each task alone
with the stream's steps, and `mmcl compare --single-task-dir` shows them as ceilings beside every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmcl.cli import main

pytestmark = pytest.mark.integration


def _final(run_dir: Path, task: str) -> float:
    return json.loads((run_dir / "matrix.json").read_text())["rows"][-1]["scores"][task]


def test_single_task_runs_each_task_alone_and_compare_shows_the_ceilings(micro_overrides, tmp_path, capsys):
    overrides = [o for o in micro_overrides("st", tasks=2) if not o.startswith(("name=", "output_dir="))]
    st = tmp_path / "st"
    assert main(["single-task", *overrides, "--seeds", "0,1", "--out", str(st), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "color_qa" in out and "shape_cls" in out and f"--single-task-dir {st}" in out
    for task in ("color_qa", "shape_cls"):
        for seed in (0, 1):
            run_dir = st / task / f"seed-{seed}"
            matrix = json.loads((run_dir / "matrix.json").read_text())
            # one task trained alone, plain fine-tuning, no retention tasks, from the recipe's settings
            assert matrix["tasks"] == [task] and matrix["retention"] == [] and len(matrix["rows"]) == 2
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert cfg["strategies"] == ["sequential"]
            assert cfg["seed"] == seed and cfg["train"]["lr"] == 1e-3 and cfg["train"]["batch_size"] == 8
            steps = json.loads((run_dir / "cost.json").read_text())["steps"]
            assert steps == 3  # 24 records / batch 8, as in the stream
    scores = json.loads((st / "single_task.json").read_text())["scores"]
    assert scores["color_qa"]["1"] == _final(st / "color_qa" / "seed-1", "color_qa")

    cmp = tmp_path / "cmp"
    args = ["compare", *overrides, "--methods", "sequential,lora", "--seeds", "0,1", "--single-task-dir", str(st),
            "--resamples", "200", "--out", str(cmp), "--no-progress"]
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("[single_task") == 4 and log.count("complete, skipped") == 4  # the reference is reused
    assert "share of the single-task ceiling" in log
    summary = json.loads((cmp / "comparison.json").read_text())
    seq_steps = json.loads((cmp / "sequential" / "seed-0" / "cost.json").read_text())["steps"]
    assert seq_steps == 2 * 3  # the same steps per task as each single-task run
    for task in ("color_qa", "shape_cls"):
        ceiling = summary["single_task"]["ceiling"][task]
        expected = (_final(st / task / "seed-0", task) + _final(st / task / "seed-1", task)) / 2
        assert ceiling["mean"] == pytest.approx(expected, abs=1e-3) and ceiling["n"] == 2
        assert ceiling["ci"][0] <= ceiling["mean"] <= ceiling["ci"][1]
        for label in ("sequential", "lora"):
            share = summary["methods"][label]["share_of_ceiling"][task]
            final = summary["methods"][label]["final_per_task"][task]["mean"]
            if ceiling["mean"] > 0:
                assert share["mean"] == pytest.approx(100 * final / ceiling["mean"], rel=1e-6)
            else:
                assert share["mean"] is None
    assert summary["baseline"] == "sequential" and summary["bootstrap"]["resamples"] == 200
    assert set(summary["methods"]["lora"]["vs_baseline"]["final_average_accuracy"]) == {"diff", "ci", "significant"}
    md = (cmp / "comparison.md").read_text()
    assert "## Share of the single-task ceiling" in md and "| single-task ceiling |" in md
    assert "## Difference from sequential" in md and "| lora |" in md

    # the reference can also be made by compare itself, into OUT/single_task
    assert main(["compare", *overrides, "--methods", "sequential", "--seeds", "0", "--single-task", "--resamples",
                 "50", "--out", str(cmp), "--no-progress"]) == 0
    assert (cmp / "single_task" / "shape_cls" / "seed-0" / "matrix.json").exists()


def test_single_task_help_and_unknown_task(micro_overrides, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["single-task", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "alone" in text and "same steps" in text and "--tasks" in text and "--seeds" in text
    overrides = [o for o in micro_overrides("st", tasks=2) if not o.startswith(("name=", "output_dir="))]
    assert main(["single-task", *overrides, "--tasks", "ocr", "--out", str(tmp_path / "x")]) == 2
    assert "--tasks: ocr not in the stream; its train tasks are color_qa, shape_cls" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_task_alone_keeps_its_stream_entry_parts_and_learning_rate(micro_world, micro_overrides, tmp_path):
    """LLaVA stage 1 as a stream entry `{task: DIR, train: [projectors], lr: LR}`: its single-task run trains the
    projectors alone at LR, so it ends with the very weights of the stream's own first task (same seed and batches);
    dropping the entry's settings would train the language model too, at train.lr."""
    import torch
    from support import FAST, QUIET, latest, tensors_of

    from mmcl.config import load_config
    from mmcl.engine import loop
    from mmcl.single_task import run_single_task

    stream = tmp_path / "staged.yaml"
    stream.write_text(yaml.safe_dump({"name": "staged", "tasks": [
        {"task": str(micro_world / "tasks" / "color_qa"), "train": ["projectors"], "lr": 0.02},
        str(micro_world / "tasks" / "shape_cls")]}))
    over = [o for o in micro_overrides("st", **FAST) if not o.startswith(("name=", "output_dir="))]
    over.append(f"data.stream={stream}")
    dirs = run_single_task(None, over, [0], tmp_path / "alone", tasks=["color_qa"], **QUIET)
    alone = dirs["color_qa"][0]
    entry = yaml.safe_load((tmp_path / "alone" / "color_qa" / "stream.yaml").read_text())["tasks"][0]
    assert entry["train"] == ["projectors"] and entry["lr"] == 0.02

    one = tmp_path / "one-task.yaml"
    one.write_text(yaml.safe_dump({"name": "one", "tasks": [yaml.safe_load(stream.read_text())["tasks"][0]]}))
    streamed = loop.run(load_config(None, [*over, f"data.stream={one}", "output_dir=" + str(tmp_path / "s")]), **QUIET)
    a, b = tensors_of(latest(alone))["model"], tensors_of(latest(streamed))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
