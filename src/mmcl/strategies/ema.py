"""Fixed-weight EMA of the trainable parameters (P2's EMA baseline); also the machinery LLaCA's adaptive EMA uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context


class EMATracker(Strategy):
    """Shared machinery: an fp32 EMA copy of every parameter that is trainable at the task's first step, created
    from the weights after that step's optimizer update, swapped into the model at `on_task_end`.

    Buffers are keyed by parameter name (so state round-trips without the model) and kept until the next task
    starts (they are checkpointed and counted in cost.json's extra_state_bytes); `on_task_start` drops them, so
    every task re-initialises its EMA from the weights the previous task's EMA left, as in P2 where each task is
    a separate process.
    """

    reads_parameters = True  # an fp32 copy of the weights, swapped in at task end

    def __init__(self, config=None):
        super().__init__(config)
        self._ema: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] | None = None

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _tracked(self, ctx: Context) -> dict[str, torch.nn.Parameter]:
        if self._params is None:
            every = dict(ctx.model.named_parameters())
            if self._ema:  # restored mid-task: follow the checkpoint's names
                missing = [n for n in self._ema if n not in every]
                if missing:
                    raise ValueError(f"{self.name}: restored EMA names parameters the model lacks, e.g. {missing[:3]}")
                self._params = {n: every[n] for n in self._ema}
            else:
                self._params = {n: p for n, p in every.items() if p.requires_grad}
        return self._params

    def _init_ema(self, params: dict[str, torch.nn.Parameter]) -> None:
        with torch.no_grad():
            self._ema = {n: p.detach().to(torch.float32, copy=True) for n, p in params.items()}

    @staticmethod
    def _as_float(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [p.detach().float() for p in params]  # no copy for fp32 parameters

    # -- hooks ------------------------------------------------------------------------------------------------------
    def on_task_start(self, ctx: Context) -> None:
        self._ema, self._params = {}, None

    def on_task_end(self, ctx: Context) -> None:
        if not self._ema:
            return  # no optimizer step was taken
        params = self._tracked(ctx)
        every = dict(ctx.model.named_parameters())
        if any(every.get(n) is not p for n, p in params.items()):
            raise ValueError(
                f"{self.name}: the parameters it tracks are no longer in the model (an adapter was merged first); "
                f"list lora before {self.name} in strategies when lora.mode=merge (task ends unwind in reverse order, "
                "so the adapter is then merged after this strategy has put its weights in)"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self._ema[n])

    # -- state ------------------------------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Memory held now: the fp32 EMA copy (fp32 even for bf16 weights: an EMA step of weight 0.01 would mostly
        round away in bf16's 8 mantissa bits)."""
        return {"ema": sum(t.numel() * t.element_size() for t in self._ema.values())}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {f"ema/{n}": t for n, t in self._ema.items()}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._ema = {k.split("/", 1)[1]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("ema/")}
        self._params = None


@dataclass
class EMAOptions:
    beta: float = 0.99
    """Weight of the old EMA at each step: ema <- beta·ema + (1-beta)·theta (P2's fixed baseline: 0.99)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"strategies.ema.beta must be in (0, 1), got {self.beta}")


@register_strategy("ema")
class EMA(EMATracker):
    """Fixed-weight EMA (the EMA baseline of P2, LLaCA, Qiao et al. 2024, arXiv 2410.10868): train as usual,
    deploy the exponential moving average of the weights.

    Rule: after every optimizer step ema <- beta·ema + (1-beta)·theta for each trainable tensor (beta = 0.99);
    the EMA starts from the weights after the task's first step; at the end of the task theta <- ema (P2's
    `ema_replace`). State: one fp32 copy of the trainable parameters (1x trainable bytes for fp32 weights, 2x for
    bf16), kept from the task's first step until the next task starts.
    """

    Config = EMAOptions

    def after_optimizer_step(self, ctx: Context) -> None:
        params = self._tracked(ctx)
        if not self._ema:
            self._init_ema(params)
            return  # ema = theta: the update would leave it unchanged
        with torch.no_grad():
            torch._foreach_lerp_([self._ema[n] for n in params], self._as_float(list(params.values())),
                                 1.0 - self.config.beta)
