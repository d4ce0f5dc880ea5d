"""A stream entry `{task: DIR, train: [PARTS]}`: only those parts learn during that task (LLaVA stage 1 as the first
task of a stream), on top of what the method trains; the next task trains what the method trains again."""

from __future__ import annotations

import pytest
import torch
import yaml
from support import QUIET, tensors_of

from mmcl.config import load_config
from mmcl.data.records import DataError
from mmcl.data.streams import load_stream
from mmcl.engine.loop import run
from mmcl.models.loading import load_backend


def _stream(tmp_path, world, first):
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump({"name": "staged", "tasks": [first, str(world / "tasks" / "shape_cls")]}))
    return path


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("strategy,lr", [("sequential", 1e-2), ("lora", 1e-9)])
def test_a_projector_only_first_task_changes_only_the_projectors(micro_world, micro_model, micro_overrides,
                                                                 tmp_path, strategy, lr):
    stream = _stream(tmp_path, micro_world, {"task": str(micro_world / "tasks" / "color_qa"), "train": ["projectors"],
                                             "lr": lr})
    over = micro_overrides(f"staged-{strategy}", tasks=7) + [f"data.stream={stream}", f"strategies=[{strategy}]",
                                                              "data.train_limit=16", "data.test_limit=2",
                                                              "eval.retention=false", "checkpoint.keep_last=0"]
    run_dir = run(load_config(None, over), **QUIET)
    base = {k: v.detach().clone() for k, v in load_backend(micro_model)[0].state_dict().items()}
    first = tensors_of(run_dir / "checkpoints" / "task-01-color_qa")["model"]
    second = tensors_of(run_dir / "checkpoints" / "task-02-shape_cls")["model"]
    # a PEFT-wrapped language model saves `base_model.model.` / `.base_layer` names; LoRA's B starts at zero
    plain = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in first.items()}
    stage1 = _changed(base, {k: plain[k] for k in base})
    assert stage1 and all(k.startswith("projectors.image.") for k in stage1)
    moved = max(float((plain[k] - base[k]).abs().max()) for k in stage1)  # AdamW moves a weight about lr per step
    assert moved > 1e-3 if lr > 1e-3 else moved < 1e-6
    adapters = [v for k, v in first.items() if "lora_B" in k]
    assert bool(adapters) == (strategy == "lora") and not any(v.any() for v in adapters)  # untouched in stage 1
    later = _changed(first, second)
    assert any(".layers." in k for k in later)  # the language model (or its adapters) learns in task 2


def test_bad_stage_entries_are_one_clean_error(tmp_path, micro_world):
    task = str(micro_world / "tasks" / "color_qa")
    for entry in ({"task": task, "train": ["vision"]}, {"task": task, "train": []}, {"task": task, "parts": ["x"]},
                  {"train": ["projectors"]}, {"task": task, "lr": 0}, {"task": task, "lr": "fast"}):
        with pytest.raises(DataError, match="task entry .* PARTS from encoders, projectors, language_model and LR > 0"):
            load_stream(_stream(tmp_path, micro_world, entry))
    [t, u] = load_stream(_stream(tmp_path, micro_world, {"task": task, "train": ["projectors"], "lr": 1e-3})).tasks
    assert (t.name, t.train_parts, t.train_lr) == ("color_qa", ["projectors"], 1e-3)
    assert (u.train_parts, u.train_lr) == (None, None)
