"""Parameter importance for the regularization baselines of P3 (EWC, MAS): the estimation pass, the per-task
normalisation, and the element-wise-max merge with P3's Id map. Shared by `ewc.py` and `mas.py`; the leading
underscore keeps the strategy auto-import from treating it as a strategy module.

Every function but `importance_pass` is pure (tensors in, tensors out) so it can be checked by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from mmcl.models.losses import token_cross_entropy_sum
from mmcl.strategies.base import Strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Batch, Example
    from mmcl.engine.context import Context

Kind = Literal["ewc", "mas"]
ID_DTYPE = torch.int16
"""Dtype of the Id map: 2 bytes per trainable element, enough for 32,767 tasks."""


class ImportanceError(ValueError):
    """The importance of a task cannot be used (non-finite); raised before any state or weight changes."""


def evenly_spaced(examples: list[Example], max_samples: int | None) -> list[Example]:
    """At most `max_samples` examples, evenly spaced over the list (deterministic, no RNG; as P3's TaskEncoder)."""
    if not max_samples or len(examples) <= max_samples:
        return list(examples)
    step = len(examples) / max_samples
    return [examples[int(i * step)] for i in range(max_samples)]


def importance_pass(
    ctx: Context,
    examples: list[Example],
    kind: Kind,
    batch_size: int,
    max_samples: int | None = None,
) -> dict[str, torch.Tensor]:
    """Raw (un-normalised) importance of every trainable parameter, float32, keyed by parameter name.

    One forward + one backward per batch over `examples` (evenly thinned to `max_samples`), model in eval mode so
    dropout is off; gradients come from `torch.autograd.grad`, so `.grad` of the parameters is never touched.

    - ewc: the mean over batches of g², g = ∂(token-mean next-token cross-entropy of the batch)/∂θ (empirical
      Fisher at batch granularity, as P3 accumulates it per step).
    - mas: the mean over batches of |∂s/∂θ| with the surrogate s = mean over *supervised* positions of ‖logits‖²₂
      (P3's `logits.pow(2).sum(-1).mean()` averages over every position, padding and prompt included; we keep
      only the positions that predict an answer token — padding depends on batch composition, and the answer is
      the function being learned).
    Batches without any supervised token are skipped. Frozen parameters get no entry.
    """
    if kind not in ("ewc", "mas"):
        raise ValueError(f"importance kind must be 'ewc' or 'mas', got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"importance batch_size must be >= 1, got {batch_size}")
    named = ctx.trainable_parameters()
    if not named:
        raise ValueError("importance: the model has no trainable parameter")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    batches = 0
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        for batch in ctx.batches(evenly_spaced(examples, max_samples), batch_size):
            target = batch.labels[:, 1:]
            mask = target != -100
            n_tokens = int(mask.sum())
            if n_tokens == 0:
                continue
            with torch.enable_grad(), ctx.accelerator.autocast():
                logits = ctx.forward(batch).logits
                if kind == "ewc":
                    loss = token_cross_entropy_sum(logits, batch.labels) / n_tokens
                else:
                    loss = logits[:, :-1][mask].float().pow(2).sum(-1).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            pairs = [(a, g.float()) for a, g in zip(acc, grads) if g is not None]
            if pairs:
                a_list, g_list = [a for a, _ in pairs], [g for _, g in pairs]
                if kind == "ewc":
                    torch._foreach_addcmul_(a_list, g_list, g_list)
                else:
                    torch._foreach_add_(a_list, torch._foreach_abs(g_list))
            batches += 1
    finally:
        model.train(was_training)
    if batches:
        torch._foreach_div_(acc, float(batches))
    return dict(zip(names, acc))


def normalise(imp: dict[str, torch.Tensor], task: str = "?") -> dict[str, torch.Tensor]:
    """`imp / total` so the task's importance sums to 1 over all elements (P3). total == 0 gives zeros; a
    non-finite value raises `ImportanceError` naming the task (before anything is merged or stored)."""
    if not imp:
        return {}
    total = torch.stack([v.double().sum() for v in imp.values()]).sum()
    total_f = float(total)
    if not math.isfinite(total_f):
        bad = [k for k, v in imp.items() if not bool(torch.isfinite(v).all())]
        raise ImportanceError(
            f"task {task!r}: importance is not finite (NaN/inf in {bad[:3]}{'...' if len(bad) > 3 else ''}); the "
            "model produced non-finite gradients on this task's data. Nothing was merged; weights are untouched"
        )
    if total_f == 0.0:
        return {k: torch.zeros_like(v) for k, v in imp.items()}
    return {k: (v.double() / total).to(v.dtype) for k, v in imp.items()}


def merge_max(
    old: dict[str, torch.Tensor] | None,
    old_id: dict[str, torch.Tensor] | None,
    new: dict[str, torch.Tensor],
    task_id: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Element-wise max of the stored and the new importance, and P3's Id map: for each element, the index of the
    task that supplied the max. Ties keep the older task (the new task must be strictly larger to take over), so
    an all-zero new importance changes nothing. `old is None` (first task) gives (new, all task_id)."""
    if not 0 <= task_id <= torch.iinfo(ID_DTYPE).max:
        raise ValueError(f"task_id {task_id} out of range for the Id map (0..{torch.iinfo(ID_DTYPE).max})")
    if old is None:
        return dict(new), {k: torch.full(v.shape, task_id, dtype=ID_DTYPE, device=v.device) for k, v in new.items()}
    if old_id is None or set(old) != set(new) or set(old_id) != set(old):
        missing = sorted(set(old) ^ set(new))
        raise ValueError(f"importance: the trainable parameters changed between tasks ({missing[:3]}...)")
    merged, ids = {}, {}
    for k, v in new.items():
        o = old[k]
        if o.shape != v.shape:
            raise ValueError(f"importance: parameter {k!r} changed shape {tuple(o.shape)} -> {tuple(v.shape)}")
        takes = v > o
        merged[k] = torch.where(takes, v, o)
        ids[k] = torch.where(takes, torch.full_like(old_id[k], task_id), old_id[k])
    return merged, ids


class _AnchorPenalty(torch.autograd.Function):
    """w·Σ_k Ω_k (θ_k − θ*_k)² with its gradient 2w·Ω·(θ − θ*) written out, instead of autograd through sub, mul,
    mul and a norm: forward = two foreach kernels and one dot per tensor, backward = one in-place scale."""

    @staticmethod
    def forward(ctx, weight, star, omega, *params):
        d = torch._foreach_sub(list(params), star)
        if d[0].dtype != torch.float32:  # square in float32 even for bf16 weights
            d = [x.float() for x in d]
        od = torch._foreach_mul(d, omega)  # Ω·(θ − θ*)
        value = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(d, od)]).sum()
        ctx.od, ctx.weight, ctx.dtypes = od, weight, [p.dtype for p in params]
        return value * weight

    @staticmethod
    def backward(ctx, grad):
        od, ctx.od = ctx.od, None
        torch._foreach_mul_(od, grad * (2.0 * ctx.weight))
        return (None, None, None, *[g if g.dtype == dt else g.to(dt) for g, dt in zip(od, ctx.dtypes)])


@dataclass
class QuadraticAnchor:
    """weight·Σ_k Ω_k (θ_k − θ*_k)² over a fixed list of parameters, with a hand-written gradient (see
    `_AnchorPenalty`): no per-parameter Python arithmetic per step and no copy beyond Ω and θ* themselves."""

    params: list[torch.nn.Parameter]
    star: list[torch.Tensor]
    omega: list[torch.Tensor]
    weight: float

    def __call__(self) -> torch.Tensor:
        return _AnchorPenalty.apply(self.weight, self.star, self.omega, *self.params)


# -- the shared strategy ------------------------------------------------------------------------------------------


@dataclass
class ImportanceOptions:
    """Options shared by EWC and MAS."""

    lambda_: float = 0.01
    """Penalty weight λ. With `scale_by_numel` the effective weight is λ·N (N = regularized elements): since each
    task's Ω sums to 1, N·Ω_k averages 1, so an element of average importance is pulled back with gradient
    2λ·(θ−θ*) whatever the model size. P3's λ=1e8 (unscaled) on InstructBLIP's ~1.1e8 trainable parameters is
    λ≈0.9 here; on the micro model (lr 1e-3) λ=1 makes the penalty's gradient ~100x the task's after 30 steps,
    λ=0.01 about equal to it, hence the default. Tune it per model and learning rate."""
    scale_by_numel: bool = True
    """Multiply λ by the number of regularized elements N (Ω sums to 1 per task, so Ω ~ 1/N). False: λ is used
    as is (P3's convention; then λ must grow with the model, e.g. 1e8)."""
    batch_size: int | None = None
    """Batch size of the importance pass; None = the per-device training micro-batch
    (train.batch_size / (train.grad_accum · processes)), so it fits wherever training fits."""
    max_samples: int | None = None
    """Estimate importance on at most this many of the task's training examples (evenly spaced); None = all."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {self.lambda_}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or null for the training micro-batch), got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 (or null for all examples), got {self.max_samples}")


class ImportanceRegularizer(Strategy):
    """Base of EWC and MAS (not registered): importance after each task, max-merged, quadratic anchor penalty."""

    reads_parameters = True  # anchors θ* of every trainable parameter

    kind: ClassVar[Kind]

    def __init__(self, config: ImportanceOptions | None = None):
        super().__init__(config)
        # dtypes: Ω in float32 whatever the weights' dtype (normalised, each element is ~1/N: bf16 would keep 2-3
        # significant digits); the Id map int16; θ* in the weights' own dtype (it is an exact copy of them, so fp32
        # would double its bytes for nothing)
        self.omega: dict[str, torch.Tensor] | None = None  # merged normalised importance, float32
        self.ids: dict[str, torch.Tensor] | None = None  # P3's Id map: task index that supplied each max
        self.star: dict[str, torch.Tensor] | None = None  # θ*: the trainable weights at the last task boundary
        self.tasks: list[str] = []  # tasks merged into Ω, in order
        self._anchor: QuadraticAnchor | None = None

    # -- hooks -----------------------------------------------------------------------------------------------------
    def on_task_start(self, ctx: Context) -> None:
        self._anchor = self._build_anchor(ctx) if self.omega is not None else None

    def extra_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self._anchor is None and self.omega is not None:  # a resume inside a task restored Ω after on_task_start
            self._anchor = self._build_anchor(ctx)
        return self._anchor() if self._anchor is not None else None

    def on_task_end(self, ctx: Context) -> None:
        self._anchor = None  # the per-task parameter list; rebuilt at the next task start
        cfg = self.config
        bs = cfg.batch_size or ctx.micro_batch_size
        task = ctx.task
        raw = importance_pass(ctx, ctx.train_examples(task.name), self.kind, bs, cfg.max_samples)
        new = normalise(raw, task.name)  # raises on NaN/inf before anything below changes
        omega, ids = merge_max(self.omega, self.ids, new, ctx.task_index)
        self.omega, self.ids = omega, ids
        self.star = {n: p.detach().clone() for n, p in ctx.trainable_parameters()}
        self.tasks.append(task.name)

    def _build_anchor(self, ctx: Context) -> QuadraticAnchor:
        named = dict(ctx.trainable_parameters())
        assert self.omega is not None and self.star is not None
        missing = [n for n in self.omega if n not in named]
        if missing:
            raise ValueError(
                f"{len(missing)} regularized parameter(s) are no longer trainable, e.g. {missing[0]!r}; keep "
                "model.train and the adapter the same across tasks (LoRA mode=merge re-creates the adapter)"
            )
        params, star, omega = [], [], []
        for n, o in self.omega.items():
            p = named[n]
            if p.shape != o.shape:
                raise ValueError(f"parameter {n!r} has shape {tuple(p.shape)}, its importance {tuple(o.shape)}")
            self.omega[n] = o.to(p.device)
            self.star[n] = self.star[n].to(device=p.device, dtype=p.dtype)
            params.append(p)
            omega.append(self.omega[n])
            star.append(self.star[n])
        numel = sum(o.numel() for o in omega)
        weight = self.config.lambda_ * (numel if self.config.scale_by_numel else 1)
        return QuadraticAnchor(params, star, omega, float(weight))

    def penalty(self) -> torch.Tensor | None:
        """The current penalty value (None before the first task ends or outside a task)."""
        return self._anchor() if self._anchor is not None else None

    # -- state -----------------------------------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, int]:
        """Memory held now: Ω (float32), the Id map (int16) and θ* (the weights' dtype)."""
        return {k: sum(t.numel() * t.element_size() for t in (v or {}).values())
                for k, v in (("omega", self.omega), ("id", self.ids), ("star", self.star))}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.omega is None:
            return {}, {"tasks": []}
        assert self.ids is not None and self.star is not None
        tensors = {f"omega/{k}": v for k, v in self.omega.items()}
        tensors |= {f"id/{k}": v for k, v in self.ids.items()}
        tensors |= {f"star/{k}": v for k, v in self.star.items()}
        return tensors, {"tasks": list(self.tasks), "numel": sum(v.numel() for v in self.omega.values())}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.tasks = list(meta.get("tasks", []))
        self._anchor = None
        if not tensors:
            self.omega = self.ids = self.star = None
            return
        parts: dict[str, dict[str, torch.Tensor]] = {"omega": {}, "id": {}, "star": {}}
        for key, v in tensors.items():
            group, _, name = key.partition("/")
            if group not in parts:
                raise ValueError(f"unexpected tensor {key!r} in {self.name} state")
            parts[group][name] = v
        if not (set(parts["omega"]) == set(parts["id"]) == set(parts["star"])):
            raise ValueError(f"{self.name} state: omega, id and star name different parameters")
        self.omega, self.ids, self.star = parts["omega"], parts["id"], parts["star"]
