"""Resume: what a checkpoint must hold to continue a run exactly, and the checks before continuing."""

from __future__ import annotations

import torch

from mmcl.engine import checkpoint as ck
from mmcl.engine.context import Context
from mmcl.engine.hooks import Strategies
from mmcl.engine.train import ResumePoint


class ResumeError(ValueError):
    """The run cannot continue from its checkpoint as configured; the message names the fields and the fix."""


# Config fields that may differ on resume without changing what the run computes.
HARMLESS_ON_RESUME = {"name", "output_dir", "checkpoint.keep_last", "checkpoint.every_steps", "eval.batch_size",
                      "train.log_with", "train.log_every", "model.feature_cache"}


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and key != "strategies":
            diffs += _config_diff(a, b, key + ".")
        elif a != b:
            diffs.append((key, b, a))
    return diffs


def check_resume_config(saved: dict, current: dict, log=print) -> None:
    """Refuse to resume with a config that changes what the run computes; harmless differences only warn."""
    diffs = _config_diff(saved, current)
    fatal = [d for d in diffs if d[0] not in HARMLESS_ON_RESUME]
    for key, now, then in diffs:
        if key in HARMLESS_ON_RESUME:
            log(f"warning: {key} differs from the checkpoint (config={now!r}, checkpoint={then!r}); using config")
    if fatal:
        lines = "\n".join(f"  {k}: config={now!r}, checkpoint={then!r}" for k, now, then in fatal)
        raise ResumeError(f"cannot resume: the config differs from the checkpoint's:\n{lines}\n"
                         "Resume with the original config, or start a new run (another name or output_dir).")


def optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as safetensors-ready tensors plus JSON (never pickled)."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def resume_point(tensors: dict, state: dict) -> ResumePoint:
    per_param: dict[int, dict] = {}
    for key, v in tensors.get("optimizer", {}).items():
        pid, name = key.split("/", 1)
        per_param.setdefault(int(pid), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        pid, name = key.split("/", 1)
        per_param.setdefault(int(pid), {})[name] = v
    return ResumePoint(
        step=state["task_step"],
        optimizer={"state": per_param, "param_groups": state["optimizer"]["param_groups"]},
        scheduler=state["scheduler"],
        rng=tensors["rng"]["torch"],
        losses=state["losses_in_task"],
        samples=state["samples_in_task"],
        skipped_steps=state["skipped_in_task"],
    )


def restore(ctx: Context, strategies: Strategies, tensors: dict, state: dict) -> None:
    """Model weights and strategy state from a checkpoint; the run's step counter from its loss log."""
    try:
        ctx.model.load_state_dict(tensors["model"], strict=True)
    except RuntimeError as e:
        raise ck.CheckpointError(f"checkpoint weights do not fit the model built from this config: {e}") from e
    strategies.load_state_dict(tensors["strategies"], state["strategies"])
    ctx.step = sum(len(v) for v in state["cost"].get("losses", {}).values())
