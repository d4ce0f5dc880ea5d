"""A frozen copy of the model at a task boundary (LwF's and MoInCL's teacher), optionally held in bfloat16 or on the
CPU to save accelerator memory. The leading underscore keeps the strategy auto-import from treating it as a
strategy module."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mmcl.eval.generate import generate_answers, generation_options

if TYPE_CHECKING:
    from mmcl.data.batching import Batch
    from mmcl.data.records import Record
    from mmcl.engine.context import Context

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TeacherOptions:
    dtype: Literal["model", "float32", "bfloat16"] = "model"
    """Weights' dtype of the teacher copy: the model's, or bfloat16 (half the bytes of an fp32 model; its logits
    differ from the fp32 teacher's by bfloat16 rounding, ~1e-2 relative)."""
    device: Literal["model", "cpu"] = "model"
    """Where the teacher lives: the model's device, or the CPU (no accelerator memory; every teacher forward then
    moves its batch to the CPU and the logits back)."""


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def make_teacher(ctx: Context, options: TeacherOptions) -> torch.nn.Module:
    """A frozen copy of the model as it is now (eval mode, no gradients), in `options`' dtype and device."""
    dtype = DTYPES.get(options.dtype, ctx.dtype)
    device = torch.device("cpu") if options.device == "cpu" else ctx.device
    # a CPU teacher of an accelerator model is copied tensor by tensor to the CPU: never two copies on the device
    teacher = _cpu_copy(ctx.model) if device.type == "cpu" and ctx.device.type != "cpu" else copy.deepcopy(ctx.model)
    teacher.to(device=device, dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _where(teacher: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(teacher.parameters())
    return p.device, p.dtype


def teacher_logits(ctx: Context, teacher: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The teacher's logits for a device batch (no gradient), back on the batch's device."""
    device, dtype = _where(teacher)
    with torch.no_grad():
        out = ctx.forward(batch.to(device, dtype), model=teacher).logits
    return out.to(batch.input_ids.device)


def teacher_generate(ctx: Context, teacher: torch.nn.Module, records: list[Record], task: str,
                     max_new_tokens: int) -> list[str]:
    """The teacher's answers, decoded with the run's `eval` settings exactly as `ctx.generate`, on its own device."""
    device, dtype = _where(teacher)
    cfg = ctx.config.eval
    return generate_answers(teacher, ctx.processor, ctx.collator(left_pad=True), records, task, max_new_tokens,
                            cfg.batch_size, device, dtype, **generation_options(cfg))


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose tensors are created on the CPU, so the accelerator never holds the copy."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        cpu = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(cpu, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cpu
    return copy.deepcopy(model, memo)
