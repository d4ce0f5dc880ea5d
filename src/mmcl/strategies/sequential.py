"""Plain sequential fine-tuning: the lower bound every method is compared with."""

from __future__ import annotations

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy


@register_strategy("sequential")
class Sequential(Strategy):
    """Sequential fine-tuning (naive FT): train on each task in turn with the task loss alone, nothing kept.

    Rule: minimise the next-token cross-entropy of task t starting from the weights left by task t-1. With
    `lora` in the composition it is P2's "baseline" (sequential LoRA); alone it trains full weights (P1's LLaVA
    recipe). State kept across tasks: none.
    """
