"""The strategy interface: a continual-learning method is a small object whose hooks the engine calls.

Hooks return values instead of poking at shared state; every hook has a no-op default, so a method overrides only
what it needs. The engine calls them in this order for each task (pinned by a test):

    prepare_model                      once, before the first task (wrap LoRA, freeze blocks)
    on_task_start                      task begins (snapshot a teacher, reset buffers)
    train_examples                     choose what this task trains on (joint, rehearsal)
    per step: transform_batch -> task_loss -> extra_loss -> (backward, optimizer) -> after_optimizer_step
    on_epoch_end                       after the last step of each epoch (weight fusion)
    on_task_end                        task done (importance, merge LoRA, swap in EMA weights); called in reverse
                                       order, so a wrapper listed first (lora) is unwound last
    state_dict / load_state_dict       checkpoint round trip: tensors (safetensors) + JSON, never pickles
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from mmcl.data.batching import Batch, Example
    from mmcl.data.overlap import ExtraData
    from mmcl.engine.context import Context


@dataclass
class NoOptions:
    """This strategy takes no options."""


class Strategy:
    """Base of every strategy. Subclasses set `name` (via the registry), `Config`, and capability flags."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    supports_full: ClassVar[bool] = True
    """Works when the full weights of the trainable parts are trained."""
    supports_peft: ClassVar[bool] = True
    """Works when a PEFT adapter (LoRA, IA3) is what trains."""
    supports_distributed: ClassVar[bool] = True
    """Correct with several processes (DDP through Accelerate)."""
    modalities: ClassVar[frozenset[str] | None] = None
    """Modalities it can handle; None means all."""
    needs_teacher: ClassVar[bool] = False
    """Keeps a frozen copy of an earlier model (memory cost)."""
    provides_peft: ClassVar[bool] = False
    """Wraps the language model in a PEFT adapter; at most one per run."""
    replaces_task_loss: ClassVar[bool] = False
    """Computes the task loss itself (e.g. soft targets); at most one per run."""
    supports_mid_task_resume: ClassVar[bool] = True
    """Its state_dict captures everything, so a run can resume inside a task (not so for a task-start teacher)."""

    requires_model: ClassVar[frozenset[str]] = frozenset()
    """Model capabilities it needs (`MLLM.capabilities`, e.g. "separable_projector"); a backend without them is
    refused before training."""

    sharded_engines: ClassVar[frozenset[str]] = frozenset()
    """Sharded engines ("fsdp", "deepspeed-zero1/2/3") it has been run under and works with, its state sharded or
    gathered correctly; under any other sharded engine it is refused before training (`check_composition`)."""
    reads_parameters: ClassVar[bool] = False
    """Reads or copies whole parameter tensors outside the forward pass (anchors, EMA or teacher copies, merges):
    structurally impossible under DeepSpeed ZeRO-3, where a process holds an empty placeholder between forwards."""
    reads_gradients: ClassVar[bool] = False
    """Reads `param.grad` after backward (gradient-driven updates): structurally impossible under DeepSpeed, which
    keeps gradients in its own buffers (measured: `param.grad` is None after backward at ZeRO-1, 2 and 3)."""

    task_options: ClassVar[frozenset[str]] = frozenset()
    """Options that may take another value for a given task (`per_task`); the others are read once."""

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        self.base_config = self.config
        self.task_configs: dict[str, Any] = {}
        """Task name -> the config in force during that task (built and checked from `per_task`)."""

    def use_task(self, task_name: str) -> None:
        """Put the task's own options (or the run's) in force; the engine calls it before `on_task_start`."""
        self.config = self.task_configs.get(task_name, self.base_config)

    # -- hooks (no-op defaults) -------------------------------------------------------------------------------------
    def prepare_model(self, ctx: Context) -> None:
        """Once before training: adapt the model (e.g. wrap the language model in LoRA)."""

    def on_task_start(self, ctx: Context) -> None:
        """A task begins; `ctx.task`, `ctx.task_index` are set."""

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        """The examples this task trains on; default: the task's own."""
        return examples

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        """Change a training batch before the forward pass (e.g. mix in replayed samples)."""
        return batch

    def task_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        """Replace the next-token cross-entropy (only strategies with `replaces_task_loss`)."""
        return None

    def extra_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        """A term added to the loss (penalty, distillation), or None."""
        return None

    def after_optimizer_step(self, ctx: Context) -> None:
        """After `optimizer.step()`, before gradients are zeroed (EMA updates read both)."""

    def on_epoch_end(self, ctx: Context) -> None:
        """After the last optimizer step of each epoch of the task (and of a last epoch cut short by max_steps)."""

    def on_task_end(self, ctx: Context) -> None:
        """The task's training is done; evaluation of the row follows."""

    def extra_training_data(self, ctx: Context) -> list[ExtraData]:
        """What the strategy trains on besides the current task's train split (instruction pools, replayed or
        rehearsed records, the prompts and inputs of pseudo examples), declared for the pre-flight leak check
        (`mmcl.data.overlap.check_run`), which refuses a run whose training data holds an evaluated record.
        Default: nothing."""
        return []

    # -- state ------------------------------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Bytes of each part of the state held now (teacher copy, EMA, importance, ...), checkpointed or not, for
        cost.json (`Cost.record_state`) and the log. Default: nothing."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) to checkpoint. Default: stateless."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state_dict` returned."""

    def describe(self) -> str:
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
