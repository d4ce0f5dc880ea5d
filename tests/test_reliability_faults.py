"""Reliability under faults inside a run (docs/reliability.md, promises 6, 7, 9, 10, 13): seeds, non-finite losses,
SIGTERM, exceptions in strategy hooks, media paths that leave the data root.

Faults are injected by the test-only `Probe` strategy (tests/support.py) at a chosen task and step.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch
from support import (
    FAST,
    PROBE,
    QUIET,
    assert_no_partial_checkpoints,
    assert_tensors_equal,
    fast_engine,
    latest,
    probe_seen,
    tensors_of,
)

from mmcl.cli import main
from mmcl.config import load_config
from mmcl.data.records import DataError
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop
from mmcl.engine.hooks import StrategyError
from mmcl.engine.train import NonFiniteLossError, Preempted

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


def probe_run(micro_overrides, name: str, tasks: int = 2, **extra) -> list[str]:
    return micro_overrides(name, tasks=tasks, strategies=f"[{PROBE}]", **dict(FAST, **extra))


def current_weights(ctx) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ctx.trainable_parameters()}


# -- 6. seeds ---------------------------------------------------------------------------------------------------------
# Same seed -> bitwise the same losses and weights, another seed differs: tests/test_engine.py::
# test_same_seed_same_run_other_seed_differs (and per strategy, tests/test_strategy_contract.py). An invalid seed is
# refused with the valid range: tests/test_config.py::test_seed_out_of_range_is_refused_with_the_range. Here: the CLI.


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1.5"])
def test_cli_refuses_an_invalid_seed_with_the_valid_range(seed, capsys):
    assert main(["run", f"seed={seed}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "seed:" in err and ("0 <= seed < 2**32" in err or "expected an integer" in err)


# -- 7. non-finite losses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_loss_with_policy_raise_stops_before_the_optimizer_step(probe, micro_overrides, monkeypatch, value):
    fast_engine(monkeypatch)
    probe.plan = {"nonfinite": {"task": 1, "steps": [1], "value": value}, "snapshot": True}
    cfg = load_config(None, probe_run(micro_overrides, "raise"))
    with pytest.raises(NonFiniteLossError, match=r"task 2/2 shape_cls: non-finite loss \((nan|-?inf)\) at step 2/2; "
                                                 r"the optimizer step was not taken"):
        loop.run(cfg, **QUIET)
    (p,) = probe.instances
    (task, step, at_start), = [s for s in p.snapshots if s[:2] == (1, 1)]
    assert_tensors_equal(at_start, current_weights(p.ctx), "weights after the refused step")
    before = next(s for s in p.snapshots if s[:2] == (1, 0))[2]
    assert any(not torch.equal(before[k], at_start[k]) for k in at_start)  # the step before did train
    assert latest(cfg.run_dir).name == "task-01-color_qa"  # the task's checkpoint was never written
    assert_no_partial_checkpoints(cfg.run_dir)


def test_nonfinite_loss_with_policy_skip_skips_counts_and_aborts_after_too_many(probe, micro_overrides, monkeypatch):
    fast_engine(monkeypatch)
    probe.plan = {"nonfinite": {"task": 0, "steps": [1], "value": "nan"}, "snapshot": True}
    skip = {"train.on_nonfinite": "skip", "train.max_steps": 3, "train.epochs": 2}
    run_dir = loop.run(load_config(None, probe_run(micro_overrides, "skip", tasks=1, **skip)), **QUIET)
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["skipped_steps"] == 1 and cost["steps"] == 3
    losses = json.loads((run_dir / "losses.json").read_text())["color_qa"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # only the steps taken
    snaps = {s[1]: s[2] for s in probe.instances[0].snapshots}
    assert_tensors_equal(snaps[1], snaps[2], "weights across the skipped step")
    assert any(not torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])

    # every step non-finite: abort after train.max_consecutive_skips, with the weights never touched
    probe.plan = {"nonfinite": {"task": 0, "steps": "all", "value": "inf"}, "snapshot": True}
    probe.instances.clear()
    cfg = load_config(None, probe_run(micro_overrides, "abort", tasks=1, **skip, **{"train.max_consecutive_skips": 2}))
    with pytest.raises(NonFiniteLossError, match=r"task 1/1 color_qa: 2 non-finite steps in a row \(last at step 2\); "
                                                 "aborting"):
        loop.run(cfg, **QUIET)
    (p,) = probe.instances
    assert_tensors_equal(p.snapshots[0][2], current_weights(p.ctx), "weights after two skipped steps")
    assert not (cfg.run_dir / "checkpoints").exists()


def _lora_merge_setup(micro_model, broken: str):
    from mmcl.models.builder import load_model
    from mmcl.strategies.lora import LoRA, LoRAOptions

    model, _ = load_model(micro_model)
    ctx = types.SimpleNamespace(model=model)
    lora = LoRA(LoRAOptions(r=4, mode="merge"))
    lora.on_task_start(ctx)
    params = dict(model.language_model.named_parameters())
    b = [n for n in params if "lora_B" in n]
    with torch.no_grad():
        for n in b:
            params[n].normal_()
        for n in (b if broken == "all" else b[-1:]):
            params[n].fill_(float("inf"))
    base = {n: p.detach().clone() for n, p in model.state_dict().items() if "lora_" not in n}
    return lora, ctx, base


def test_a_nonfinite_lora_adapter_is_refused_by_the_merge_and_the_base_weights_stay_bitwise(micro_model):
    """Every adapter layer non-finite: the safe merge raises and the base weights are untouched. (EWC with a NaN
    importance: tests/test_strategies_p3.py::test_non_finite_importance_raises_and_leaves_weights_untouched.)"""
    lora, ctx, base = _lora_merge_setup(micro_model, "all")
    with pytest.raises(ValueError, match=r"non-finite values in \d+ tensor"):
        lora.on_task_end(ctx)
    after = ctx.model.state_dict()
    assert_tensors_equal(base, {k: after[k] for k in base}, "base weights")


def test_one_nonfinite_lora_layer_leaves_the_in_memory_base_weights_bitwise(micro_model):
    lora, ctx, base = _lora_merge_setup(micro_model, "last")
    with pytest.raises(ValueError, match="non-finite values in 1 tensor"):
        lora.on_task_end(ctx)
    after = {k.replace(".base_layer", ""): v for k, v in ctx.model.state_dict().items()}
    assert_tensors_equal({k.replace(".base_layer", ""): v for k, v in base.items()},
                         {k.replace(".base_layer", ""): after[k.replace(".base_layer", "")] for k in base}, "base")


# -- 9. SIGTERM, in process -------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_the_resume_loses_nothing(probe, micro_overrides,
                                                                                     monkeypatch):
    """SIGTERM after step 1 of task 2 (sent from after_optimizer_step, like a scheduler would): Preempted, a complete
    mid-task checkpoint after that step, the previous handler back in place; a second SIGTERM while the checkpoint
    is being written changes nothing; the resumed run consumes the same samples and ends with the same weights."""
    fast_engine(monkeypatch)
    over = {"train.max_steps": 3, "train.epochs": 2}
    full = loop.run(load_config(None, probe_run(micro_overrides, "full", **over)), **QUIET)

    probe.plan = {"sigterm": [[1, 0]]}
    real_save_file = ck.save_file

    def second_sigterm_while_writing(tensors, path, metadata=None):
        import os

        if "-step-" in str(path):  # the save SIGTERM asked for: a second SIGTERM, ignored, the save goes on
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", second_sigterm_while_writing)
    received = []

    def mine(*args):
        received.append(args)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        cfg = load_config(None, probe_run(micro_overrides, "cut", **over))
        logs: list[str] = []
        with pytest.raises(Preempted, match=r"task 2/2 shape_cls: stopped after step 1/3 on request"):
            loop.run(cfg, progress=False, log=logs.append)
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []  # the run's handler took both signals
    assert handler is mine  # the handler in place before the run is back
    assert "SIGTERM: finishing the current step, then writing a checkpoint" in logs
    assert logs.count("SIGTERM: finishing the current step, then writing a checkpoint") == 1
    ckpt = latest(cfg.run_dir)
    assert ckpt.name == "task-02-shape_cls-step-000001"
    ck.verify_checkpoint(ckpt)
    assert_no_partial_checkpoints(cfg.run_dir)
    assert [t for t, _ in probe_seen(ckpt)] == [0, 0, 0, 1]  # step 1 of task 2 finished before stopping

    monkeypatch.setattr(ck, "save_file", real_save_file)
    probe.plan = {}
    resumed = loop.run(cfg, resume=True, **QUIET)
    assert probe_seen(latest(full)) == probe_seen(latest(resumed))
    assert_tensors_equal(tensors_of(latest(full))["model"], tensors_of(latest(resumed))["model"], "weights")
    assert json.loads((full / "matrix.json").read_text())["rows"] == json.loads((resumed / "matrix.json")
                                                                                 .read_text())["rows"]


def test_sigterm_with_early_stopping_keeps_the_boundary_checkpoint_and_the_resume_redoes_the_task(
        probe, micro_overrides, monkeypatch):
    """Early stopping keeps the best epoch's weights in memory, so SIGTERM inside a task writes no mid-task
    checkpoint: the run stops after the step, the last boundary checkpoint stays the latest, and the resume redoes
    the task from its start and ends exactly as an uninterrupted run."""
    fast_engine(monkeypatch)
    over = {"train.max_steps": 3, "train.epochs": 2, "train.early_stopping_patience": 1, "train.val_fraction": 0.25}
    full = loop.run(load_config(None, probe_run(micro_overrides, "es-full", **over)), **QUIET)
    probe.plan = {"sigterm": [[1, 0]]}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cfg = load_config(None, probe_run(micro_overrides, "es-cut", **over))
        with pytest.raises(Preempted, match=r"task 2/2 shape_cls: stopped after step 1/"):
            loop.run(cfg, **QUIET)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert latest(cfg.run_dir).name == "task-01-color_qa"
    assert_no_partial_checkpoints(cfg.run_dir)
    probe.plan = {}
    resumed = loop.run(cfg, resume=True, **QUIET)
    assert_tensors_equal(tensors_of(latest(full))["model"], tensors_of(latest(resumed))["model"], "weights")
    rows = [json.loads((d / "matrix.json").read_text())["rows"] for d in (full, resumed)]
    stops = [json.loads((d / "cost.json").read_text())["early_stopping"] for d in (full, resumed)]
    assert rows[0] == rows[1] and stops[0] == stops[1] and len(stops[0]) == 2


def test_sigterm_through_the_cli_exits_143_and_restores_the_handler(probe, micro_overrides, monkeypatch, capsys):
    fast_engine(monkeypatch)
    probe.plan = {"sigterm": [[0, 0]]}
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", *probe_run(micro_overrides, "cli", **{"train.max_steps": 3, "train.epochs": 2}),
                 "--no-progress"]) == loop.PREEMPTED_EXIT_CODE == 143
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "preempted: task 1/2 color_qa: stopped after step 1/3 on request" in err


# -- 10. an exception inside a strategy hook --------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["on_task_start", "transform_batch", "extra_loss", "after_optimizer_step",
                                  "on_task_end", "state_dict"])
def test_an_exception_in_a_strategy_hook_names_strategy_and_hook_and_leaves_no_partial_checkpoint(
    hook, probe, micro_overrides, monkeypatch
):
    fast_engine(monkeypatch)
    probe.plan = {"fail": {"hook": hook, "task": 1, "step": 1}}
    cfg = load_config(None, probe_run(micro_overrides, hook, **{"checkpoint.every_steps": 1}))
    with pytest.raises(StrategyError, match=rf"strategy '{PROBE}' failed in hook '{hook}': RuntimeError: boom"):
        loop.run(cfg, **QUIET)
    assert_no_partial_checkpoints(cfg.run_dir)
    names = {p.name for p in (cfg.run_dir / "checkpoints").iterdir() if p.is_dir()}
    expected = {"on_task_start": "task-01-color_qa", "state_dict": "task-01-color_qa"}.get(
        hook, "task-02-shape_cls-step-000001")
    assert latest(cfg.run_dir).name == expected
    assert not any(n.startswith("task-02-shape_cls") and "-step-" not in n for n in names)


# -- 13. media paths cannot leave the data root -----------------------------------------------------------------------


def escaping_task(world: Path, where: Path) -> tuple[Path, list[str]]:
    """color_qa copied with three training records whose image leaves the data root (.., absolute, symlink)."""
    src = world / "tasks" / "color_qa"
    task = where / "escape"
    shutil.copytree(src, task)
    outside = where / "outside"
    outside.mkdir()
    lines = (task / "train.jsonl").read_text().splitlines()
    ids = []
    for n, how in ((1, "dotdot"), (3, "absolute"), (5, "symlink")):
        rec = json.loads(lines[n])
        image = Path(rec["image"])
        shutil.copy(task / image, outside / image.name)
        if how == "dotdot":
            rec["image"] = f"../outside/{image.name}"
        elif how == "absolute":
            rec["image"] = str(outside / image.name)
        else:
            (task / "images" / "link.png").symlink_to(outside / image.name)
            rec["image"] = "images/link.png"
        lines[n] = json.dumps(rec)
        ids.append(rec["id"])
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    stream = where / "escape.yaml"
    stream.write_text(f"name: escape\ntasks: [{task}]\n")
    return stream, ids


def test_a_run_refuses_media_outside_the_data_root_before_training_unless_allowed(probe, micro_overrides, micro_world,
                                                                                 monkeypatch, tmp_path):
    fast_engine(monkeypatch)
    stream, ids = escaping_task(micro_world, tmp_path)
    over = {"data.stream": stream, "train.batch_size": 8, "train.max_steps": 1}
    with pytest.raises(DataError, match=r"(?s)train\.jsonl:2: media path '\.\./outside/.*outside the data root.*"
                                        r"train\.jsonl:4: media path '.*' is absolute.*train\.jsonl:6: media path "
                                        r"'images/link\.png' resolves to .*outside.*outside the data root"):
        loop.run(load_config(None, probe_run(micro_overrides, "refused", tasks=1, **over)), **QUIET)
    assert probe.instances == [] and not (tmp_path / "refused").exists()  # nothing trained, nothing written

    run_dir = loop.run(load_config(None, probe_run(micro_overrides, "allowed", tasks=1, **over,
                                                   **{"data.allow_outside_root": "true"})), **QUIET)
    assert (run_dir / "skipped.jsonl").read_text() == ""
    consumed = {i for _, batch in probe_seen(latest(run_dir)) for i in batch}
    assert set(ids) <= consumed  # the escaping records were read and trained on, as asked
