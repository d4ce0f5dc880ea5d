"""LLaCA (P2): EMA of the trainable parameters whose weight adapts per tensor and per step to the gradient."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmcl.strategies.ema import EMATracker
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context


def alpha_from_norms(a: float, b: float, c: float, k: float, base: float) -> float:
    """alpha = k·(1 + b) / (a·c), or `base` when that is not in (0, 1) or cannot be computed (a·c = 0, NaN, inf)."""
    try:
        alpha = k * (1.0 + b) / (a * c)
    except ZeroDivisionError:
        return base
    return alpha if 0.0 < alpha < 1.0 else base  # NaN and inf fail the comparison


def ema_weight(
    param: torch.Tensor,
    ema: torch.Tensor,
    grad: torch.Tensor | None,
    prev_grad: torch.Tensor | None,
    k: float,
    base: float,
) -> float:
    """The weight alpha of the new weights in LLaCA's EMA update of one tensor (P2's CoIN `ema_update`):

        alpha = K·(1 + ||g||_1) / (||theta - theta*||_1 · ||g - g_prev||_1)

    with theta the weights after the optimizer step, theta* the EMA before this update, g the gradient of this
    step and g_prev that of the previous step. Falls back to `base` when alpha is not in (0, 1), when there is no
    g_prev (first step) or no g, or when the division is not finite. Reference implementation (one host sync
    per norm); the strategy computes the same values batched.
    """
    if grad is None or prev_grad is None:
        return base
    a = float((param.float() - ema.float()).abs().sum())
    b = float(grad.float().abs().sum())
    c = float((grad.float() - prev_grad.float()).abs().sum())
    return alpha_from_norms(a, b, c, k, base)


WEIGHTS_LOG = "llaca_weights.jsonl"
"""Run-directory file with one line per optimizer step: the distribution of that step's per-tensor weights."""
WEIGHTS_SUMMARY = "llaca_weights.json"
"""Run-directory file with the distribution of the weights over each finished task (what the report shows)."""
EDGES: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 1))
"""Histogram bin edges of the weight alpha: half-decades from 1e-6 to 1 (alpha < 1e-6 goes to the first bin)."""


def histogram(values: list[float]) -> list[int]:
    """Counts of `values` in the bins [EDGES[i], EDGES[i+1]) (the first bin also takes everything below)."""
    counts = [0] * (len(EDGES) - 1)
    for v in values:
        i = next((j for j in range(len(EDGES) - 2, -1, -1) if v >= EDGES[j]), 0)
        counts[i] += 1
    return counts


def summarise(lines: list[dict]) -> dict[str, dict]:
    """Per task, the distribution of the weights over all its (step, tensor) pairs, from the per-step log lines;
    a step logged twice (a run resumed inside the task re-does steps) counts once, with its last line."""
    by_task: dict[str, dict[int, dict]] = {}
    for line in lines:
        by_task.setdefault(line["task"], {})[line["step"]] = line
    out = {}
    for task, steps in by_task.items():
        rows = list(steps.values())
        n = sum(r["tensors"] for r in rows)
        out[task] = {
            "steps": len(rows),
            "weights": n,
            "fallback_share": sum(r["fallback"] for r in rows) / n if n else None,
            "mean": sum(r["sum"] for r in rows) / n if n else None,
            "min": min(r["min"] for r in rows),
            "max": max(r["max"] for r in rows),
            "histogram": {"edges": list(EDGES), "counts": [sum(c) for c in zip(*(r["counts"] for r in rows))]},
        }
    return out


@dataclass
class LLaCAOptions:
    k: float = 2.0
    """K, the numerator's scale (CoIN repo: 2; the same group's Continual-NExT uses 0.01)."""
    base: float = 0.01
    """Fallback weight of the new weights when the adaptive one is not in (0, 1) (CoIN repo: 0.01, i.e. beta =
    0.99; Continual-NExT: 0.001)."""

    def __post_init__(self) -> None:
        if not (self.k > 0 and math.isfinite(self.k)):
            raise ValueError(f"strategies.llaca.k must be a finite number > 0, got {self.k}")
        if not 0.0 < self.base < 1.0:
            raise ValueError(f"strategies.llaca.base must be in (0, 1), got {self.base}")


@register_strategy("llaca")
class LLaCA(EMATracker):
    """LLaCA adaptive EMA (P2, Qiao et al. 2024, arXiv 2410.10868; rule as implemented in JingyangQiao/CoIN).

    Rule, after every optimizer step and for every trainable tensor theta with gradient g:
    alpha = ema_weight(theta, ema, g, g_prev, K, base) (see that function); ema <- (1 - alpha)·ema + alpha·theta;
    g_prev <- g. The EMA starts from the weights after the task's first step; at the end of the task
    theta <- ema. P2 runs it with `lora` in carry mode. Per step: the three L1 norms of all tensors are computed
    with foreach kernels and read back in one host sync. Measured, not assumed: every step's weights are logged
    to the run directory (`llaca_weights.jsonl`: per-step count, fallback count, sum, min, max and a histogram
    over half-decades), and each finished task's distribution to `llaca_weights.json` (shown in the report).
    State: fp32 EMA weights + previous gradients in the gradients' dtype (2x trainable bytes for fp32 weights,
    3x for bf16), kept from the task's first
    step until the next task starts; the next task re-initialises both, as P2's one-process-per-task runs do.
    """

    reads_gradients = True  # reads param.grad every step

    Config = LLaCAOptions

    def __init__(self, config=None):
        super().__init__(config)
        self._prev: dict[str, torch.Tensor] = {}
        self.last_weights: list[float] = []  # the per-tensor weights of the latest step

    def _log(self, ctx: Context, alphas: list[float]) -> None:
        """Append this step's weight distribution to the run directory's log (main process only)."""
        self.last_weights = alphas
        if ctx.run_dir is None or not ctx.accelerator.is_main_process:
            return
        base = self.config.base
        line = {"task": ctx.task.name, "step": ctx.task_step + 1, "tensors": len(alphas),
                "fallback": sum(1 for a in alphas if a == base), "sum": math.fsum(alphas),
                "min": min(alphas), "max": max(alphas), "counts": histogram(alphas)}
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(ctx.run_dir) / WEIGHTS_LOG, "a") as f:
            f.write(json.dumps(line) + "\n")

    def on_task_end(self, ctx: Context) -> None:
        super().on_task_end(ctx)
        if ctx.run_dir is None or not ctx.accelerator.is_main_process:
            return
        log = Path(ctx.run_dir) / WEIGHTS_LOG
        if log.is_file():
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            tmp = Path(ctx.run_dir) / f".{WEIGHTS_SUMMARY}.tmp"
            tmp.write_text(json.dumps(summarise(lines), indent=1))
            tmp.replace(Path(ctx.run_dir) / WEIGHTS_SUMMARY)

    def on_task_start(self, ctx: Context) -> None:
        super().on_task_start(ctx)
        self._prev = {}

    def after_optimizer_step(self, ctx: Context) -> None:
        params = self._tracked(ctx)
        if not self._ema:
            self._init_ema(params)
        names = list(params)
        k, base = self.config.k, self.config.base
        with torch.no_grad():
            thetas = self._as_float(list(params.values()))
            emas = [self._ema[n] for n in names]
            with_g = [i for i, n in enumerate(names) if params[n].grad is not None]
            with_prev = [i for i in with_g if names[i] in self._prev]
            grads = [params[names[i]].grad for i in with_g]
            norms: list[torch.Tensor] = []
            if with_prev:
                # a = ||theta - ema||_1, b = ||g||_1, c = ||g - g_prev||_1, only where alpha can be adaptive
                g_now = [params[names[i]].grad.float() for i in with_prev]
                gaps = torch._foreach_sub([thetas[i] for i in with_prev], [emas[i] for i in with_prev])
                diffs = torch._foreach_sub(g_now, [self._prev[names[i]].float() for i in with_prev])
                norms = [*torch._foreach_norm(gaps, 1), *torch._foreach_norm(g_now, 1), *torch._foreach_norm(diffs, 1)]
                del gaps, diffs
            values = torch.stack(norms).tolist() if norms else []  # the one host sync of the step
            m = len(with_prev)
            alphas = [base] * len(names)
            for j, i in enumerate(with_prev):
                alphas[i] = alpha_from_norms(values[j], values[m + j], values[2 * m + j], k, base)
            groups: dict[float, list[int]] = {}
            for i, a in enumerate(alphas):
                groups.setdefault(a, []).append(i)
            for a, idx in groups.items():
                torch._foreach_lerp_([emas[i] for i in idx], [thetas[i] for i in idx], a)
            self._log(ctx, alphas)
            for i, g in zip(with_g, grads):
                prev = self._prev.get(names[i])
                if prev is None:
                    self._prev[names[i]] = g.detach().clone()
                else:
                    prev.copy_(g)

    def state_bytes(self) -> dict[str, int]:
        """Memory held now: the fp32 EMA and the previous gradients (in the gradients' dtype)."""
        return super().state_bytes() | {"prev_grad": sum(t.numel() * t.element_size() for t in self._prev.values())}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict()
        return tensors | {f"prev_grad/{n}": t for n, t in self._prev.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state_dict(tensors, meta)
        self._prev = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("prev_grad/")}
