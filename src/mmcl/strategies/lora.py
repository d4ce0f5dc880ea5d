"""LoRA through PEFT on the language model, carried across tasks (P2) or merged after each task (P1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context


@dataclass
class LoRAOptions:
    r: int = 8
    """Rank of the update (P1 uses hidden/2, P2 128, P4 8)."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (P1's setting)."""
    targets: list[str] | None = None
    """Module names or a regex of the language model's layers to adapt; None = every linear layer but the output
    head (peft's "all-linear"). Only the language model is ever wrapped, never an encoder."""
    mode: Literal["carry", "merge"] = "carry"
    """carry: one adapter trained across all tasks (P2/LLaCA protocol). merge: after each task the adapter is merged
    into the base weights and a fresh one is attached for the next task (P1's protocol)."""


@register_strategy("lora")
class LoRA(Strategy):
    """LoRA (Hu et al. 2021) as used by P1 and P2: W = W0 + (alpha/r)·B·A on the language model's linear layers.

    Rule: only A, B (and the projectors, per `model.train`) are trained; the language model's base weights stay
    frozen. In `merge` mode W0 <- W0 + (alpha/r)·B·A after each task (safe merge: a non-finite adapter raises and
    leaves W0 untouched) and a fresh adapter starts the next task. State: the adapter weights live in the model's
    checkpoint; nothing else.
    """

    reads_parameters = True  # merge mode merges the adapter into the full weights

    Config = LoRAOptions
    provides_peft = True

    def _wrap(self, ctx: Context) -> None:
        from peft import LoraConfig, TaskType, get_peft_model

        c = self.config
        lm = ctx.model.language_model
        # a causal LM (the composition's) gets peft's causal-LM wrapper; a native VLM's decoder stack (no head of
        # its own) gets the plain one, which passes every keyword of the VLM's call through
        causal = getattr(lm, "get_output_embeddings", lambda: None)() is not None
        cfg = LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            use_rslora=c.rslora,
            target_modules=c.targets if c.targets else "all-linear",
            task_type=TaskType.CAUSAL_LM if causal else None,
            bias="none",
        )
        ctx.model.language_model = get_peft_model(lm, cfg)

    def prepare_model(self, ctx: Context) -> None:
        if self.config.mode == "carry":
            self._wrap(ctx)

    def on_task_start(self, ctx: Context) -> None:
        if self.config.mode == "merge":
            self._wrap(ctx)

    def on_task_end(self, ctx: Context) -> None:
        if self.config.mode == "merge":
            # peft's safe merge checks one layer at a time, so a layer merged before a broken one would already be
            # changed; check every adapter tensor first so a non-finite adapter never touches the base weights.
            bad = [n for n, p in ctx.model.language_model.named_parameters()
                   if "lora_" in n and not torch.isfinite(p).all()]
            if bad:
                raise ValueError(
                    f"the LoRA adapter has non-finite values in {len(bad)} tensor(s) (e.g. {bad[0]}); refusing to "
                    "merge it into the base weights"
                )
            ctx.model.language_model = ctx.model.language_model.merge_and_unload(safe_merge=True)
