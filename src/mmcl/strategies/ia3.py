"""IA3 through PEFT on the language model, carried across tasks (P1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context

# Llama-family names; anything else falls back to every linear layer but the head, with no feed-forward scaling.
_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA_FEEDFORWARD = ["down_proj"]


def _linear_leaf_names(model: nn.Module) -> set[str]:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@dataclass
class IA3Options:
    targets: list[str] | None = None
    """Linear layers of the language model to rescale (module-name suffixes). None: every linear layer but the
    output head (P1's "all-linear"), i.e. for Llama q/k/v/o/gate/up/down_proj."""
    feedforward: list[str] | None = None
    """Which of `targets` are feed-forward layers (their *input* is rescaled rather than their output); must be a
    subset of targets. None: down_proj where the model has it (peft's Llama default), else none."""

    def __post_init__(self) -> None:
        if self.targets is not None and not self.targets:
            raise ValueError("strategies.ia3.targets must name at least one module, or be left unset")
        if self.feedforward and self.targets is not None and not set(self.feedforward) <= set(self.targets):
            raise ValueError(
                f"strategies.ia3.feedforward must be a subset of strategies.ia3.targets; "
                f"{sorted(set(self.feedforward) - set(self.targets))} are not targets"
            )


@register_strategy("ia3")
class IA3(Strategy):
    """IA3 (Liu et al. 2022) as used by P1 (Srivastava et al. 2024, arXiv 2410.19925): learned per-channel scales.

    Rule: every targeted linear layer of the language model computes l ⊙ (W x) (attention-type) or W (l ⊙ x)
    (feed-forward), with W frozen and the scale vectors l (initialised to 1) trained; P1 uses PEFT's IA3Config
    with target_modules="all-linear". One IA3 adapter is trained across all tasks (carry). State kept across
    tasks: the scale vectors, which live in the model's checkpoint; nothing else.
    """

    Config = IA3Options
    provides_peft = True

    def prepare_model(self, ctx: Context) -> None:
        from peft import IA3Config, TaskType, get_peft_model

        lm = ctx.model.language_model
        present = _linear_leaf_names(lm)
        targets = self.config.targets
        if targets is None:
            targets = [n for n in _LLAMA_LINEAR if n in present] or sorted(present)
        feedforward = self.config.feedforward
        if feedforward is None:
            feedforward = [n for n in _LLAMA_FEEDFORWARD if n in targets]
        if not any(t in present for t in targets):
            raise ValueError(f"strategies.ia3.targets: none of {targets} is a linear layer of the language model "
                             f"(it has {sorted(present)})")
        causal = getattr(lm, "get_output_embeddings", lambda: None)() is not None  # see LoRA._wrap
        cfg = IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward),
                        task_type=TaskType.CAUSAL_LM if causal else None)
        ctx.model.language_model = get_peft_model(lm, cfg)
