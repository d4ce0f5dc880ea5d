"""Continual-learning strategies: one file per method behind the hooks of `Strategy`, found through the registry."""

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import (
    build_strategies,
    check_composition,
    get_strategy,
    list_strategies,
    register_strategy,
)

# Importing a strategy module registers it.
from mmcl.strategies import joint, lora, sequential  # noqa: E402,F401  isort: skip

__all__ = ["Strategy", "build_strategies", "check_composition", "get_strategy", "list_strategies", "register_strategy"]
