"""Soft targets (P1): next-token cross-entropy against label-smoothed targets instead of one-hot ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Batch
    from mmcl.engine.context import Context


def soft_target_loss_sum(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sum over supervised positions of the cross-entropy with soft targets (1-alpha on the gold token,
    alpha/(V-1) on each of the V-1 others).

    Same alignment as the engine's `token_cross_entropy_sum`: `logits` (B, T, V) at position i predict `labels`
    (B, T) at position i+1; positions whose label is -100 contribute nothing. With alpha = 0 this is exactly the
    summed cross-entropy. Computed without materialising a (N, V) target tensor:
        -[(1-alpha)·log p_gold + alpha/(V-1)·(sum_v log p_v - log p_gold)].
    """
    logits = logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError("soft targets need a vocabulary of at least 2 tokens")
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V), supervised positions only
    gold = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
    others = logp.sum(-1) - gold
    return -((1.0 - alpha) * gold + (alpha / (vocab - 1)) * others).sum()


@dataclass
class SoftTargetsOptions:
    alpha: float = 0.01
    """Probability mass moved off the gold token, spread evenly over the other V-1 tokens. 0.01 is P1's
    `create_cl.py` value (some of its run names use 0.1); the value used in the paper is not known."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"strategies.soft_targets.alpha must be in [0, 1), got {self.alpha}")


@register_strategy("soft_targets")
class SoftTargets(Strategy):
    """Soft targets (P1, Srivastava et al. 2024, arXiv 2410.19925): label-smoothed next-token cross-entropy.

    Rule: the target distribution at every supervised position is 1-alpha on the gold token and alpha/(V-1) on
    every other token of the vocabulary V; positions labelled -100 get no target. The task loss is the sum of
    these cross-entropies over supervised tokens (the engine divides by the global supervised-token count, so
    the mean matches P1's). With `lora` it is P1's mSGM. State kept across tasks: none.
    """

    Config = SoftTargetsOptions
    replaces_task_loss = True

    def task_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor:
        return soft_target_loss_sum(outputs.logits, batch.labels, self.config.alpha)
