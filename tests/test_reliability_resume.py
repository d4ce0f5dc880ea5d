"""Reliability: a resumed run is the run that was interrupted (docs/reliability.md, promises 1, 2, 4, 8, 11, 12).

Every parity check here is bitwise (CPU), and the data-order check has a negative control showing it catches a
resume that loses the data position.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from support import (
    CASES,
    PROBE,
    QUIET,
    assert_no_partial_checkpoints,
    assert_same_run,
    assert_tensors_equal,
    die_at_row,
    fast_engine,
    latest,
    overrides_for,
    probe_seen,
    tensors_of,
)

from mmcl.config import load_config
from mmcl.data.records import DataError
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop
from mmcl.engine.hooks import StrategyError
from mmcl.strategies import list_strategies

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest


def record_optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    """Every optimizer `fit` creates, in order (the engine makes a fresh AdamW per task)."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return made


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    flat = {f"{pid}/{k}": v.clone() if torch.is_tensor(v) else torch.tensor(v)
            for pid, st in sd["state"].items() for k, v in st.items()}
    return flat, copy.deepcopy(sd["param_groups"])


# -- 1. task-boundary resume, every registered strategy ---------------------------------------------------------------


@pytest.mark.parametrize("name", list_strategies())
def test_boundary_resume_is_bitwise_exact_for_every_strategy(name, micro_overrides, monkeypatch):
    """Interrupted after task 1 (row 2's evaluation crashes), resumed with --resume: the same weights, optimizer
    state, strategy state (importance, EMA weights, replay memory, ...), losses and accuracy matrix as a run that
    was never interrupted."""
    if name not in CASES:
        pytest.fail(f"no CASES row for {name!r} in tests/support.py")
    fast_engine(monkeypatch)
    optimizers = record_optimizers(monkeypatch)
    full = loop.run(load_config(None, overrides_for(micro_overrides, f"{name}-full", name)), **QUIET)
    opt_full = optimizer_tensors(optimizers[-1])

    real = die_at_row(monkeypatch, 2)
    cfg = load_config(None, overrides_for(micro_overrides, f"{name}-cut", name))
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, **QUIET)
    assert latest(cfg.run_dir).name == "task-01-color_qa"
    assert_no_partial_checkpoints(cfg.run_dir)
    monkeypatch.setattr(loop, "evaluate_row", real)
    optimizers.clear()
    resumed = loop.run(cfg, resume=True, **QUIET)

    assert len(optimizers) == 1  # task 1 was not trained again
    assert_same_run(full, resumed)
    opt_resumed = optimizer_tensors(optimizers[-1])
    assert_tensors_equal(opt_full[0], opt_resumed[0], "optimizer state")
    assert opt_full[1] == opt_resumed[1]


# -- 2. mid-task resume: no sample lost, none repeated ----------------------------------------------------------------

MID = {"data.train_limit": 16, "train.batch_size": 4, "train.epochs": 2, "train.max_steps": 6,
       "checkpoint.every_steps": 2, "data.test_limit": 1, "eval.max_new_tokens": 1, "eval.retention": "false"}


def assert_same_samples(full: Path, resumed: Path) -> None:
    """The check of promise 2: the sequence of consumed sample ids (per step, across tasks) is identical."""
    a, b = probe_seen(latest(full)), probe_seen(latest(resumed))
    assert a == b, f"consumed samples differ: {len(a)} vs {len(b)} batches"


def test_mid_task_resume_consumes_exactly_the_same_samples(probe, micro_overrides, monkeypatch, tmp_path):
    """Checkpoints every 2 steps; a crash in step 5 of task 2 (an epoch later than the first shuffle); resume: the
    consumed ids equal the uninterrupted run's, and so do weights and optimizer state. Negative control: the same
    resume with the data position dropped (restart the task's batches at 0) is caught by the same check."""
    fast_engine(monkeypatch)
    optimizers = record_optimizers(monkeypatch)
    over = dict(MID, strategies=f"[{PROBE}]")
    full = loop.run(load_config(None, micro_overrides("full", tasks=2, **over)), **QUIET)
    opt_full = optimizer_tensors(optimizers[-1])
    seen = probe_seen(latest(full))
    assert [t for t, _ in seen] == [0] * 6 + [1] * 6
    for task in (0, 1):  # each epoch is a permutation of the 16 records: nothing lost or doubled to begin with
        ids = [i for t, b in seen if t == task for i in b]
        first, second = ids[:16], ids[16:]
        assert len(set(first)) == 16 and len(set(second)) == len(second) and set(second) <= set(first)

    probe.plan = {"fail": {"hook": "after_optimizer_step", "task": 1, "step": 4}}
    cfg = load_config(None, micro_overrides("cut", tasks=2, **over))
    with pytest.raises(StrategyError, match="boom"):
        loop.run(cfg, **QUIET)
    assert latest(cfg.run_dir).name == "task-02-shape_cls-step-000004"
    assert_no_partial_checkpoints(cfg.run_dir)
    control_dir = tmp_path / "control"
    shutil.copytree(cfg.run_dir, control_dir)

    probe.plan = {}
    optimizers.clear()
    resumed = loop.run(cfg, resume=True, **QUIET)
    assert_same_samples(full, resumed)
    assert_tensors_equal(tensors_of(latest(full))["model"], tensors_of(latest(resumed))["model"], "weights")
    assert_tensors_equal(opt_full[0], optimizer_tensors(optimizers[-1])[0], "optimizer state")
    assert json.loads((full / "losses.json").read_text()) == json.loads((resumed / "losses.json").read_text())
    assert latest(resumed).name == "task-02-shape_cls"

    # negative control: a resume that restores everything but the position in the task's batches
    real = loop.resume_point
    monkeypatch.setattr(loop, "resume_point", lambda t, s: dataclasses.replace(real(t, s), step=0))
    control = loop.run(load_config(None, micro_overrides("control", tasks=2, **over)), resume=True, **QUIET)
    with pytest.raises(AssertionError, match="consumed samples differ"):
        assert_same_samples(full, control)


# -- 4. corrupt newest checkpoint: automatic resume falls back and says so --------------------------------------------


def test_resume_skips_a_corrupt_checkpoint_and_redoes_its_task(micro_overrides, monkeypatch):
    fast_engine(monkeypatch)
    cfg = load_config(None, overrides_for(micro_overrides, "corrupt", "sequential", **{"checkpoint.keep_last": 0}))
    run_dir = loop.run(cfg, **QUIET)
    newest = latest(run_dir)
    assert newest.name == "task-02-shape_cls"
    original = tensors_of(newest)
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])  # truncated

    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors: \d+ bytes but \d+ were written; the file is "
                                                 r"truncated or altered"):
        ck.load_checkpoint(newest)
    logs: list[str] = []
    loop.run(cfg, resume=True, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "warning: skipping checkpoint task-02-shape_cls" in text and "model.safetensors" in text
    assert "falling back to the previous one" in text
    assert "resuming" in text and "after task 1 from checkpoint task-01-color_qa" in text
    # task 2 was redone from task 1's checkpoint and wrote bitwise the checkpoint that had been corrupted
    redone = tensors_of(latest(run_dir))
    for group in original:
        assert_tensors_equal(original[group], redone[group], group)
    assert_no_partial_checkpoints(run_dir)


# -- 8. bad records: listed up front; skipped deterministically, across a resume --------------------------------------


def broken_task(world: Path, where: Path) -> tuple[Path, dict[int, str | None]]:
    """color_qa with three bad training records; returns the stream file and {line: id} of the bad ones."""
    task = where / "broken"
    task.mkdir()
    src = world / "tasks" / "color_qa"
    (task / "task.yaml").write_text((src / "task.yaml").read_text().replace("data_root: .", f"data_root: {src}"))
    lines = (src / "train.jsonl").read_text().splitlines()
    bad = {3: None, 5: json.loads(lines[4])["id"], 9: json.loads(lines[8])["id"]}
    lines[2] = "{not json"
    rec = json.loads(lines[4])
    rec["conversations"][1]["value"] = " "
    lines[4] = json.dumps(rec)
    rec = json.loads(lines[8])
    rec["image"] = "images/does-not-exist.png"
    lines[8] = json.dumps(rec)
    (task / "train.jsonl").write_text("\n".join(lines) + "\n")
    (task / "test.jsonl").write_text((src / "test.jsonl").read_text())
    stream = where / "broken.yaml"
    stream.write_text(f"name: broken\ntasks: [{task}]\n")
    return stream, bad


def test_bad_records_are_listed_up_front_and_skipped_identically_across_a_resume(
    probe, micro_overrides, micro_world, monkeypatch, tmp_path
):
    fast_engine(monkeypatch)
    stream, bad = broken_task(micro_world, tmp_path)
    base = {"strategies": f"[{PROBE}]", "data.stream": stream, "train.batch_size": 4, "train.max_steps": 5,
            "data.test_limit": 1, "eval.max_new_tokens": 1, "eval.retention": "false"}

    # policy error (the default): every bad record as file:line: reason, before any training
    with pytest.raises(DataError, match=r"(?s)3 bad record\(s\).*train\.jsonl:3: invalid JSON.*train\.jsonl:5: "
                                        r"conversations\[1\] is an empty answer.*"
                                        r"train\.jsonl:9: image file not found"):
        loop.run(load_config(None, micro_overrides("err", tasks=1, **base)), **QUIET)
    assert not (tmp_path / "err").exists() and probe.instances == []

    # policy skip, uninterrupted
    skip = dict(base, **{"data.on_bad_record": "skip", "data.max_bad_fraction": 0.2})
    full = loop.run(load_config(None, micro_overrides("full", tasks=1, **skip)), **QUIET)
    skipped = [json.loads(x) for x in (full / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["id"]) for s in skipped] == list(bad.items())
    good_ids = [json.loads(x)["id"] for n, x in enumerate((stream.parent / "broken" / "train.jsonl").read_text()
                                                           .splitlines(), 1) if n not in bad]
    consumed = [i for _, b in probe_seen(latest(full)) for i in b]
    assert len(consumed) == 20 and len(set(consumed)) == 20  # 5 steps of 4 in the first epoch: no id twice
    assert set(consumed) <= set(good_ids) and not set(consumed) & {i for i in bad.values() if i}

    # policy skip, crash in step 4 with a checkpoint after step 2, resume: same skips, same order
    probe.plan = {"fail": {"hook": "transform_batch", "task": 0, "step": 3}}
    cfg = load_config(None, micro_overrides("cut", tasks=1, **skip, **{"checkpoint.every_steps": 2}))
    with pytest.raises(StrategyError):
        loop.run(cfg, **QUIET)
    probe.plan = {}
    resumed = loop.run(cfg, resume=True, **QUIET)
    assert (resumed / "skipped.jsonl").read_text() == (full / "skipped.jsonl").read_text()
    assert_same_samples(full, resumed)
    assert_tensors_equal(tensors_of(latest(full))["model"], tensors_of(latest(resumed))["model"], "weights")

    # too many bad records for the configured fraction: abort before training (3 of 24 > 0.1)
    with pytest.raises(DataError,
                       match=r"color_qa/train: 3 of 24 records are bad, more than data\.max_bad_fraction=0\.1"):
        loop.run(load_config(None, micro_overrides("many", tasks=1, **dict(skip, **{"data.max_bad_fraction": 0.1}))),
                 **QUIET)
    assert not (tmp_path / "many" / "checkpoints").exists()


# -- 11. resume refuses an incompatible config, listing every field ---------------------------------------------------


def test_resume_refuses_an_incompatible_config_and_only_warns_on_harmless_keys(micro_overrides, micro_model,
                                                                                 monkeypatch, tmp_path):
    fast_engine(monkeypatch)
    over = {"strategies": "[lora]", "strategies.lora.r": 4, "train.max_steps": 1, "data.train_limit": 4,
            "train.batch_size": 4, "data.test_limit": 1, "eval.max_new_tokens": 1, "eval.retention": "false"}
    cfg = load_config(None, micro_overrides("r", tasks=2, **over))
    run_dir = loop.run(cfg, **QUIET)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    other_model = tmp_path / "model-copy"
    shutil.copytree(micro_model, other_model)
    changed = micro_overrides("r", tasks=2, **dict(over, **{"strategies.lora.r": 8})) + [
        f"model.path={other_model}", "data.order=[shape_cls,color_qa]"]
    with pytest.raises(ValueError, match="cannot resume") as e:
        loop.run(load_config(None, changed), resume=True, **QUIET)
    msg = str(e.value)
    assert "  data.order: config=['shape_cls', 'color_qa'], checkpoint=None" in msg
    assert f"  model.path: config='{other_model}', checkpoint='{micro_model}'" in msg
    assert "  strategies: config=[{'lora': {'r': 8}}], checkpoint=[{'lora': {'r': 4}}]" in msg
    with pytest.raises(ValueError,
                       match=r"strategies: config=\['sequential'\], checkpoint=\[\{'lora': \{'r': 4\}\}\]"):
        other = {k: v for k, v in over.items() if not k.startswith("strategies")}
        loop.run(load_config(None, micro_overrides("r", tasks=2, strategies="[sequential]", **other)), resume=True,
                 **QUIET)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # refused before any write

    logs: list[str] = []
    harmless = micro_overrides("r", tasks=2, **over, **{"eval.batch_size": 2, "checkpoint.keep_last": 5})
    loop.run(load_config(None, harmless), resume=True, progress=False, log=logs.append)
    assert "warning: eval.batch_size differs from the checkpoint (config=2, checkpoint=64); using config" in logs
    assert "warning: checkpoint.keep_last differs from the checkpoint (config=5, checkpoint=2); using config" in logs



def test_autoresume_before_the_first_checkpoint_starts_fresh_and_sweeps_stale_saves(micro_overrides, monkeypatch):
    """A job script that always passes --resume: killed before its first checkpoint (row 1's evaluation crashes),
    with a save that a SIGKILL cut short left behind, the resume sweeps the stale save, says it starts from the
    beginning with the saved config, and ends with the matrix and losses of a run that was never interrupted."""
    fast_engine(monkeypatch)
    full = loop.run(load_config(None, overrides_for(micro_overrides, "auto-full", "sequential")), **QUIET)
    cfg = load_config(None, overrides_for(micro_overrides, "auto", "sequential"))
    real = die_at_row(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, **QUIET)
    monkeypatch.setattr(loop, "evaluate_row", real)
    ckpts = cfg.run_dir / "checkpoints"
    assert not (ckpts / "latest").exists()
    (ckpts / ".tmp-task-01-color_qa-99999").mkdir(parents=True)  # what a SIGKILL inside save_checkpoint leaves
    (ckpts / ".tmp-task-01-color_qa-99999" / "model.safetensors").write_bytes(b"half")
    (ckpts / ".latest.tmp").write_text("task-01-color_qa\n")
    logs: list[str] = []
    loop.run(load_config(cfg.run_dir / "config.yaml", [f"output_dir={cfg.run_dir}"]), resume=True, progress=False,
             log=logs.append)
    assert any("removed 2 incomplete checkpoint save(s)" in line for line in logs)
    assert any("no complete checkpoint" in line and "from the beginning" in line for line in logs)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    for f in ("matrix.json", "losses.json"):
        assert json.loads((full / f).read_text()) == json.loads((cfg.run_dir / f).read_text()), f


def test_cli_resume_of_a_run_directory_that_does_not_exist_yet_starts_it(micro_overrides, tmp_path, monkeypatch):
    """`mmcl run RECIPE --resume DIR` works on the job's first launch too: DIR does not exist, the run starts."""
    from mmcl.cli import main

    fast_engine(monkeypatch)
    run_dir = tmp_path / "first-launch"
    over = [o for o in overrides_for(micro_overrides, "first", "sequential", tasks=1) if not o.startswith("output_dir")]
    assert main(["run", *over, "--resume", str(run_dir), "--no-progress"]) == 0
    assert json.loads((run_dir / "matrix.json").read_text())["tasks"] == ["color_qa"]


# -- 12. pruning never deletes the checkpoint resumed from or the latest; base model untouched ------------------------


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pruning_after_a_resume_keeps_the_resumed_and_the_latest_checkpoint(micro_overrides, micro_model,
                                                                              monkeypatch):
    fast_engine(monkeypatch)
    base_before = _hash_tree(micro_model)
    cfg = load_config(None, overrides_for(micro_overrides, "prune", "sequential", tasks=3,
                                          **{"checkpoint.keep_last": 1}))
    real = die_at_row(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, **QUIET)
    monkeypatch.setattr(loop, "evaluate_row", real)

    ckpts = cfg.run_dir / "checkpoints"
    resumed_from = ckpts / "task-01-color_qa"
    real_save = ck.save_checkpoint
    seen_after_save = []

    def watched(*args, **kwargs):
        out = real_save(*args, **kwargs)
        # after every save and prune: the checkpoint being resumed from and the latest one both still verify
        ck.verify_checkpoint(resumed_from)
        ck.verify_checkpoint(latest(cfg.run_dir))
        seen_after_save.append(sorted(p.name for p in ckpts.iterdir() if p.is_dir()))
        return out

    monkeypatch.setattr(loop.ck, "save_checkpoint", watched)
    loop.run(cfg, resume=True, **QUIET)
    assert seen_after_save == [["task-01-color_qa", "task-02-shape_cls"], ["task-01-color_qa", "task-03-count"]]
    assert latest(cfg.run_dir).name == "task-03-count"
    assert _hash_tree(micro_model) == base_before  # the base model's files are never modified
