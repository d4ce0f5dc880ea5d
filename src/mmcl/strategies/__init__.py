"""Continual-learning strategies: one file per method behind the hooks of `Strategy`, found through the registry.

Every module in this package is imported here, so a new method is one new file with a `@register_strategy` class.
"""

import importlib
import pkgutil

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import (
    build_strategies,
    check_composition,
    check_task_options,
    get_strategy,
    list_strategies,
    register_strategy,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "registry") and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Strategy", "build_strategies", "check_composition", "check_task_options", "get_strategy",
           "list_strategies", "register_strategy"]
