"""Soft targets (P1): next-token cross-entropy against label-smoothed targets instead of one-hot ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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


def all_positions_scale(labels: torch.Tensor) -> float:
    """Factor that turns the engine's mean over supervised positions into P1's mean over all positions of the
    batch: (supervised positions) / (every position, prompt and padding included) = n_sup / (B·(T−1))."""
    target = labels[:, 1:]
    return float((target != -100).sum()) / max(target.numel(), 1)


@dataclass
class SoftTargetsOptions:
    alpha: float = 0.01
    """Probability mass moved off the gold token, spread evenly over the other V-1 tokens. 0.01 is P1's
    `create_cl.py` value (some of its run names use 0.1); the value used in the paper is not known."""
    average: Literal["supervised", "all"] = "supervised"
    """What the loss is a mean over. supervised (default): the answer tokens, like the engine's cross-entropy, so
    alpha = 0 is exactly sequential fine-tuning and only alpha changes. all: P1's form, PyTorch's cross-entropy
    with probability targets over every position of the batch (prompt and padding get an all-zero target yet
    count in the mean), i.e. the supervised mean times n_supervised / (B·(T−1)): a smaller, batch-dependent
    effective learning rate."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"strategies.soft_targets.alpha must be in [0, 1), got {self.alpha}")
        if self.average not in ("supervised", "all"):
            raise ValueError(f"strategies.soft_targets.average must be 'supervised' or 'all', got {self.average!r}")


@register_strategy("soft_targets")
class SoftTargets(Strategy):
    """Soft targets (P1, Srivastava et al. 2024, arXiv 2410.19925): label-smoothed next-token cross-entropy.

    Rule: the target distribution at every supervised position is 1-alpha on the gold token and alpha/(V-1) on
    every other token of the vocabulary V; positions labelled -100 get no target. The task loss is the sum of
    these cross-entropies over supervised tokens, which the engine divides by the global supervised-token count
    (`average: supervised`, the default), or P1's mean over every position of the batch (`average: all`): the sum
    is scaled by n_supervised / (B·(T−1)) of the micro-batch, exactly P1's mean with one micro-batch per step
    (with accumulation each micro-batch's mean is weighted by its share of supervised tokens, not equally). With
    `lora` in merge mode it is P1's mSGM (the `msgm` preset). State kept across tasks: none.
    """

    Config = SoftTargetsOptions
    replaces_task_loss = True

    def task_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor:
        total = soft_target_loss_sum(outputs.logits, batch.labels, self.config.alpha)
        return total * all_positions_scale(batch.labels) if self.config.average == "all" else total
