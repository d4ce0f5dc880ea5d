"""Experiment tracking (`train.log_with`) through Accelerate's trackers: a run logged to TensorBoard, read back with
TensorBoard's own EventAccumulator, holds exactly the run's losses (every `log_every` steps), matrix rows and final
metrics; a tracker whose package is missing is refused before anything is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from support import FAST, QUIET, die_at_row, fast_engine

from mmcl.cli import main
from mmcl.config import ConfigError, load_config
from mmcl.engine import loop
from mmcl.engine.tracking import flat

pytestmark = pytest.mark.integration


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_runs_losses_rows_and_metrics(micro_overrides, monkeypatch):
    pytest.importorskip("tensorboard")
    fast_engine(monkeypatch)
    over = dict(FAST, **{"train.epochs": 2, "train.max_steps": 3, "train.log_with": "[tensorboard]", "train.log_every": 2})
    run_dir = loop.run(load_config(None, micro_overrides("tb", tasks=2, **over)), **QUIET)

    logged = scalars(run_dir / "tracking" / "mmcl")
    losses = json.loads((run_dir / "losses.json").read_text())
    assert [len(v) for v in losses.values()] == [3, 3]
    every = losses["color_qa"] + losses["shape_cls"]  # global steps 1..6; log_every=2 keeps steps 2, 4, 6
    assert [s for s, _ in logged["train/loss"]] == [2, 4, 6]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([every[1], every[3], every[5]], rel=1e-6)

    rows = json.loads((run_dir / "matrix.json").read_text())["rows"]
    assert len(rows) == 3
    for task in ("color_qa", "shape_cls"):
        # row j at the global step after task j: 0, 3, 6
        assert logged[f"score/{task}"] == [(3 * j, pytest.approx(r["scores"][task], rel=1e-6)) for j, r in enumerate(rows)]

    metrics = {k: v for k, v in flat(json.loads((run_dir / "metrics.json").read_text())).items()
               if isinstance(v, (int, float))}
    assert "final_average_accuracy" in metrics
    for name, value in metrics.items():
        assert logged[f"metrics/{name}"] == [(6, pytest.approx(value, rel=1e-6, abs=1e-6))], name
    assert not {t for t in logged if t.startswith("metrics/")} - {f"metrics/{k}" for k in metrics}


def test_a_resumed_run_logs_each_step_once_with_the_resumed_values(micro_overrides, monkeypatch):
    """Killed at row 2 (after task 2's steps were logged), resumed from task 1's checkpoint: task 2's steps are
    logged again; the resumed run tells TensorBoard to drop what was logged after its checkpoint (purge_step), so
    each step appears once, with the values of the run that finished."""
    pytest.importorskip("tensorboard")
    fast_engine(monkeypatch)
    over = dict(FAST, **{"train.epochs": 2, "train.max_steps": 3, "train.log_with": "[tensorboard]",
                         "train.log_every": 1})
    cfg = load_config(None, micro_overrides("tb-resume", tasks=2, **over))
    real = die_at_row(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, **QUIET)
    first = scalars(cfg.run_dir / "tracking" / "mmcl")["train/loss"]
    assert [s for s, _ in first] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(loop, "evaluate_row", real)
    loop.run(cfg, resume=True, **QUIET)

    logged = scalars(cfg.run_dir / "tracking" / "mmcl")
    losses = json.loads((cfg.run_dir / "losses.json").read_text())
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged["train/loss"]] == pytest.approx(losses["color_qa"] + losses["shape_cls"], rel=1e-6)
    assert [s for s, _ in logged["score/color_qa"]] == [0, 3, 6]
    rows = json.loads((cfg.run_dir / "matrix.json").read_text())["rows"]
    assert [v for _, v in logged["score/shape_cls"]] == pytest.approx([r["scores"]["shape_cls"] for r in rows])


def test_flat_config_is_scalar_and_dotted():
    out = flat({"train": {"lr": 1e-3, "log_with": ["tensorboard"], "max_steps": None}, "seed": 3, "ok": True})
    assert out == {"train.lr": 1e-3, "train.log_with": '["tensorboard"]', "seed": 3, "ok": True}


def test_an_unknown_tracker_is_a_config_error(micro_overrides):
    with pytest.raises(ConfigError, match=r"train.log_with\[0\]: 'neptune' is not one of 'tensorboard'"):
        load_config(None, micro_overrides("bad", **{"train.log_with": "[neptune]"}))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_without_its_package_is_refused_in_one_line_before_anything_is_written(micro_overrides, capsys):
    args = micro_overrides("nowandb", tasks=1, **FAST, **{"train.log_with": "[tensorboard,wandb]"})
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    assert main(["run", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.log_with: 'wandb' needs the package 'wandb'") and "pip install wandb" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not run_dir.exists()
