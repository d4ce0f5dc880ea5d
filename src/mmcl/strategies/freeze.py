"""Freezing parts of the language model (P1): the last transformer block (OLF) or the output embedding (OOLF)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.data.batching import Example
    from mmcl.engine.context import Context

_LAYER_LISTS = ("layers", "h", "blocks")


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The language model's transformer blocks: the first `nn.ModuleList` whose attribute name is one of
    layers / h / blocks (Llama, Mistral, Qwen: `model.layers`; GPT-2: `transformer.h`; Pythia: `gpt_neox.layers`).
    Works through a PEFT wrapper."""
    for name, module in language_model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and len(module):
            return module
    raise ValueError(
        f"cannot find the transformer blocks of {type(language_model).__name__}: no non-empty nn.ModuleList "
        f"named one of {_LAYER_LISTS}"
    )


def _freeze(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)


class _Freeze(Strategy):
    """Shared hooks: freeze in prepare_model, and again at each task start and just before the optimizer is
    built (train_examples is the last hook before `fit`), so adapters attached later (lora merge mode, or lora
    listed after this strategy) are frozen too."""

    def _params(self, ctx: Context) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def prepare_model(self, ctx: Context) -> None:
        _freeze(self._params(ctx))

    def on_task_start(self, ctx: Context) -> None:
        _freeze(self._params(ctx))

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        _freeze(self._params(ctx))
        return examples


@register_strategy("freeze_last_block")
class FreezeLastBlock(_Freeze):
    """Output-layer freezing, OLF (P1, Srivastava et al. 2024, arXiv 2410.19925): the last transformer block of
    the language model is never trained.

    Rule: requires_grad = False on every parameter of the last decoder block (P1's `apply_olf`); everything else
    trains as configured. Under `lora`/`ia3` the block's adapter weights are frozen (P1's mSGM+OLF). State kept
    across tasks: none.
    """

    def _params(self, ctx: Context) -> list[torch.nn.Parameter]:
        return list(decoder_layers(ctx.model.language_model)[-1].parameters())


@register_strategy("freeze_output_embedding")
class FreezeOutputEmbedding(_Freeze):
    """Output-embedding freezing, OOLF (P1, Srivastava et al. 2024, arXiv 2410.19925; P1 ran it on Pythia, whose
    `embed_out` is untied): the output projection of the language model is never trained.

    Rule: requires_grad = False on the parameters of `get_output_embeddings()`. When input and output embeddings
    are tied (the built-in tiny Llama, many small LMs) they are one tensor, so the input embedding is frozen too.
    An adapter (lora, ia3) never adapts the output head, so there this strategy would do nothing and is refused
    (supports_peft = False). State kept across tasks: none.
    """

    supports_peft = False

    def _params(self, ctx: Context) -> list[torch.nn.Parameter]:
        head = ctx.model.output_embeddings()
        if head is None:
            raise ValueError(f"{type(ctx.model).__name__} has no output embedding to freeze")
        return list(head.parameters())
