"""Experiment tracking through Accelerate's trackers (`train.log_with: [tensorboard]`, also wandb and mlflow): the
training loss every `train.log_every` optimizer steps, each row of the accuracy matrix, and the final metrics, with
the resolved run config as the run's hyperparameters. Files of local trackers go to `RUN_DIR/tracking/`.

One step axis for everything, the global optimizer step (1, 2, ... over all tasks): the loss at its step, each row
of the accuracy matrix at the step it was evaluated after (row 0 at step 0, row j after task j's last step), the
final metrics at the last step. A resumed run logs into the same directory and redoes the steps after its
checkpoint; TensorBoard is told to drop what the interrupted run logged after that checkpoint (`purge_step`), so
every step appears once, with the values of the run that finished.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mmcl.config import ConfigError, RunConfig

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name (as Accelerate spells it) -> the package it needs."""
PROJECT = "mmcl"


def accelerator_kwargs(cfg: RunConfig) -> dict:
    """`log_with` and `project_config` for `Accelerator(...)` (nothing without trackers). A tracker whose package is
    not installed is refused here, before any training, naming the package."""
    names = list(cfg.train.log_with)
    if not names:
        return {}
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"train.log_with: {name!r} needs the package {PACKAGES[name]!r}, which is not installed; "
                              f"install it (pip install {PACKAGES[name]}) or remove {name!r} from train.log_with")
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "tracking"))
    return {"log_with": names, "project_config": project}


def flat(values: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """A nested mapping as dotted keys with scalar values (what TensorBoard's hyperparameters accept): lists and
    mappings inside lists become JSON text; None values are left out."""
    out: dict = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out


class Tracker:
    """The loop's handle on the trackers; every method does nothing when `train.log_with` is empty (and Accelerate
    logs on the main process only)."""

    def __init__(self, accelerator, cfg: RunConfig, step: int = 0):
        """`step`: the global step the run (re)starts after (0 for a fresh start, else its checkpoint's)."""
        self.accelerator, self.every = accelerator, cfg.train.log_every
        self.on = bool(cfg.train.log_with)
        if self.on:
            purge = {"tensorboard": {"purge_step": step + 1 if step else 0}}
            accelerator.init_trackers(PROJECT, config=flat(cfg.to_dict()), init_kwargs=purge)

    def loss(self, step: int, loss: float) -> None:
        """The training loss of global optimizer step `step` (1-based), every `train.log_every` steps."""
        if self.on and step % self.every == 0:
            self.accelerator.log({"train/loss": loss}, step=step)

    def row(self, step: int, scores: dict[str, float]) -> None:
        """A row of the accuracy matrix, evaluated after global step `step`: one scalar per task."""
        if self.on:
            self.accelerator.log({f"score/{task}": float(v) for task, v in scores.items()}, step=step)

    def finish(self, run_dir: Path, step: int) -> None:
        """Log the final metrics (as written to metrics.json, numbers only) at the last global step, then close
        the trackers (what `accelerator.end_training()` does, less destroying the process group)."""
        if not self.on:
            return
        if self.accelerator.is_main_process:
            metrics = flat(json.loads((run_dir / "metrics.json").read_text()))
            numbers = {f"metrics/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                       and not isinstance(v, bool)}
            self.accelerator.log(numbers, step=step)
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
