"""Strategy registry: `@register_strategy("name")`, lookup, construction from config, and composition checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mmcl.config import ConfigError, StrategySpec, build_dataclass
from mmcl.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Register a strategy class under `name` (lower_snake_case; a duplicate is an error, not a warning)."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if not _NAME.match(name):
            raise ValueError(f"strategy name {name!r} must be lower_snake_case (letters, digits, underscores)")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name].__module__}")
        if not issubclass(cls, Strategy):
            raise TypeError(f"{cls.__name__} must subclass mmcl.strategies.Strategy")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_strategy(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ConfigError(f"strategies: unknown strategy {name!r}; known: {', '.join(list_strategies())} (mmcl list)")
    return _REGISTRY[name]


def list_strategies() -> list[str]:
    return sorted(_REGISTRY)


def build_strategies(specs: Sequence[StrategySpec]) -> list[Strategy]:
    """Instantiate strategies with their typed configs; unknown or mistyped options name the strategy and option."""
    out = []
    for spec in specs:
        cls = get_strategy(spec.name)
        where = f"strategies.{spec.name}"
        options = {k: v for k, v in spec.options.items() if k != "per_task"}
        strategy = cls(build_dataclass(cls.Config, options, where))
        per_task = spec.options.get("per_task") or {}
        if not isinstance(per_task, dict):
            raise ConfigError(f"{where}.per_task: expected a mapping of task name to options, e.g. "
                              f"{{image_qa: {{...}}}}, got {per_task!r}")
        for task, task_opts in per_task.items():
            at = f"{where}.per_task.{task}"
            if not isinstance(task_opts, dict):
                raise ConfigError(f"{at}: expected a mapping of options, got {task_opts!r}")
            config = build_dataclass(cls.Config, options | task_opts, at)  # unknown or mistyped options first
            fixed = sorted(set(task_opts) - cls.task_options)
            if fixed:
                allowed = ", ".join(sorted(cls.task_options)) or "none"
                raise ConfigError(f"{at}.{fixed[0]}: {spec.name!r} reads this option once, before the first task, "
                                  f"so it cannot change per task; options it takes per task: {allowed}")
            strategy.task_configs[str(task)] = config
        out.append(strategy)
    return out


def check_task_options(strategies: Sequence[Strategy], task_names: Sequence[str]) -> None:
    """Refuse per-task options for a task the stream does not have (a typo would silently do nothing)."""
    for s in strategies:
        unknown = sorted(set(s.task_configs) - set(task_names))
        if unknown:
            raise ConfigError(f"strategies.{s.name}.per_task.{unknown[0]}: no such task in the stream; "
                              f"its tasks: {', '.join(task_names)}")


CAPABILITIES = {
    "separable_projector": "a projector module of its own per modality (Qwen2-VL's merger lives inside its vision "
                           "tower)",
    "routable_projectors": "projectors that mmcl calls itself, so each sample can be routed (the composition: "
                           "`tiny`, mmcl model directories, or a LLaVA checkpoint with model.backend=composition)",
}
"""What each model capability a strategy may require (`Strategy.requires_model`) means, for refusal messages."""


ENGINES = ("single", "ddp", "fsdp", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
"""How a run is spread over processes (`mmcl.engine.distributed.engine_name`): one process, DDP (every process holds
the whole model), FSDP, or a DeepSpeed ZeRO stage. The last five are the sharded engines."""
SHARDED_ENGINES = frozenset(ENGINES[2:])
NOT_MEASURED = ("mmcl has not been run under it: Accelerate 1.15 enables FSDP and DeepSpeed only on GPUs (on a CPU it "
                "falls back to DDP), and no GPU was available to measure it; see docs/distributed.md")
"""Why a sharded engine a strategy does not list in `Strategy.sharded_engines` is refused."""


def engine_refusal(strategy: Strategy, engine: str) -> str | None:
    """Why `strategy` cannot run under `engine` (None: it can): a structural reason first, else that it was never
    measured there."""
    if engine not in SHARDED_ENGINES or engine in strategy.sharded_engines:
        return None
    if strategy.reads_gradients and engine.startswith("deepspeed"):
        why = "it reads param.grad after backward, and DeepSpeed keeps gradients in its own buffers (param.grad is None)"
    elif strategy.reads_parameters and engine == "deepspeed-zero3":
        why = ("it reads or copies whole parameters outside the forward pass, and ZeRO-3 leaves an empty placeholder "
               "of each parameter on a process between forwards")
    else:
        why = NOT_MEASURED
    return f"strategies: {strategy.name!r} cannot run under the {engine} engine: {why}. Use configs/accelerate/ddp.yaml"


def check_composition(strategies: Sequence[Strategy], *, modalities: set[str], num_processes: int = 1,
                      model_capabilities: frozenset[str] | None = None, backend: str = "",
                      engine: str = "single") -> None:
    """Refuse, before training, a combination the engine cannot run; the message says why and what to do."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    names = [s.name for s in strategies]
    peft = [s.name for s in strategies if s.provides_peft]
    if len(peft) > 1:
        raise ConfigError(f"strategies: {peft} each wrap the model in an adapter; keep one of them")
    losses = [s.name for s in strategies if s.replaces_task_loss]
    if len(losses) > 1:
        raise ConfigError(f"strategies: {losses} each replace the task loss; keep one of them")
    for s in strategies:
        if peft and not s.supports_peft and not s.provides_peft:
            raise ConfigError(
                f"strategies: {s.name!r} does not support adapter training, but {peft[0]!r} adds one; "
                f"remove {peft[0]!r} to train full weights"
            )
        if not peft and not s.supports_full:
            raise ConfigError(f"strategies: {s.name!r} needs an adapter; add 'lora' to strategies (e.g. [lora, {s.name}])")
        if num_processes > 1 and not s.supports_distributed:
            raise ConfigError(
                f"strategies: {s.name!r} does not support distributed training yet; run it in one process"
            )
        refused = engine_refusal(s, engine)
        if refused:
            raise ConfigError(refused)
        missing = s.requires_model - model_capabilities if model_capabilities is not None else frozenset()
        if missing:
            why = "; ".join(CAPABILITIES.get(c, c) for c in sorted(missing))
            raise ConfigError(f"strategies: {s.name!r} cannot run on the {backend or 'chosen'} backend: it needs {why}")
        if s.modalities is not None and not modalities <= s.modalities:
            raise ConfigError(
                f"strategies: {s.name!r} handles {sorted(s.modalities)} but the stream has {sorted(modalities)}"
            )
    if "joint" in names and len(names) > 1 and any(n in names for n in ("rehearsal", "replay")):
        raise ConfigError("strategies: 'joint' already trains on all earlier data; drop rehearsal/replay")
