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
        cfg = build_dataclass(cls.Config, spec.options, f"strategies.{spec.name}")
        out.append(cls(cfg))
    return out


def check_composition(strategies: Sequence[Strategy], *, modalities: set[str], num_processes: int = 1) -> None:
    """Refuse, before training, a combination the engine cannot run; the message says why and what to do."""
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
        if s.modalities is not None and not modalities <= s.modalities:
            raise ConfigError(
                f"strategies: {s.name!r} handles {sorted(s.modalities)} but the stream has {sorted(modalities)}"
            )
    if "joint" in names and len(names) > 1 and any(n in names for n in ("rehearsal", "replay")):
        raise ConfigError("strategies: 'joint' already trains on all earlier data; drop rehearsal/replay")
