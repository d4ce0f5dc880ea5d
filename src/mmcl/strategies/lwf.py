"""LwF (Li & Hoiem 2017) as P3's baseline: distil the previous task's model into the current one on current data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmcl.strategies._teacher import TeacherOptions, make_teacher, module_bytes, teacher_logits
from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Batch
    from mmcl.engine.context import Context


@dataclass
class LwFOptions:
    lambda_: float = 1.0
    """Weight of the distillation term (P3's `lwf_lbd`, 1.0 in its InstructBLIP code; a LLaVA fork uses 0.2)."""
    temperature: float = 2.0
    """Softmax temperature T of both teacher and student; the KL is multiplied by T² (Hinton et al.)."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    """Dtype and device of the teacher copy (`{dtype: bfloat16}`, `{device: cpu}`; see `strategies/_teacher.py`)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {self.lambda_}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the positions that predict a supervised token
    (labels[:, 1:] != -100), computed in float32. Zero when there is no such position."""
    mask = labels[:, 1:] != -100
    n = int(mask.sum())
    if n == 0:
        return student.sum() * 0.0
    zs = student[:, :-1][mask].float() / temperature
    zt = teacher[:, :-1][mask].float() / temperature
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum")
    return kl * (temperature**2) / n


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem 2017), P3's LwF baseline ("Continual Instruction Tuning for Large
    Multimodal Models", He et al. 2023; P3's exact KD form is not known, this is the standard one).

    Rule: at the start of task t ≥ 2 the model is copied as a frozen teacher (eval mode, no gradients). Each step
    adds λ·T²·KL(softmax(z_teacher/T) ‖ softmax(z/T)) averaged over the supervised positions of the current
    (micro-)batch, teacher logits under no_grad; task 1 trains with the task loss alone. State across tasks: none
    in the checkpoint — the teacher of task t is the model at the t−1/t boundary, which is exactly what a resumed
    run restores, so `on_task_start` rebuilds it. Memory: one extra full copy of the model while a task trains
    (freed at task end; `teacher: {dtype: bfloat16}` halves it, `{device: cpu}` keeps it off the accelerator);
    compute: one extra forward pass per micro-batch.
    """

    reads_parameters = True  # a teacher copy of the model

    Config = LwFOptions
    task_options = frozenset({"lambda_", "temperature"})
    needs_teacher = True
    supports_mid_task_resume = False  # the teacher is the model at task start, rebuilt there, not checkpointed

    def __init__(self, config: LwFOptions | None = None):
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None

    def on_task_start(self, ctx: Context) -> None:
        self.teacher = None
        if ctx.task_index >= 1:
            self.teacher = make_teacher(ctx, self.config.teacher)

    def extra_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self.teacher is None or self.config.lambda_ == 0:
            return None
        old = teacher_logits(ctx, self.teacher, batch)
        kd = distillation_loss(outputs.logits, old, batch.labels, self.config.temperature)
        return self.config.lambda_ * kd

    def on_task_end(self, ctx: Context) -> None:
        self.teacher = None  # free the copy before evaluation

    def state_bytes(self) -> dict[str, int]:
        """Memory held now: the teacher copy while a task ≥ 2 trains."""
        return {"teacher": module_bytes(self.teacher)}
