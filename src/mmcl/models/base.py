"""The model seam: what every backend gives the engine (design.md, "Model backends").

A backend is a pair for one model family:
- a `Processor` (text and media in): LLaVA conversations -> token ids and labels (labels -100 on everything but the
  answers), media files -> model inputs plus the tokens that stand for them in the text, generated ids -> answer;
- an `MLLM` (an `nn.Module`): forward -> logits aligned with the input ids, generate -> the new tokens only, and the
  named parts (`encoders`, `projectors`, `language_model`) that `model.train` and LoRA/IA3 act on.

Text is encoded once with ONE placeholder token per media item (`Processor.placeholder_id`); the collator replaces
it by the item's own tokens (`MediaItem.tokens`) once the media are decoded, since some families (Qwen2-VL,
Idefics3) need as many tokens as the image has patches or tiles. The engine and the strategies see only this
surface, so one loop trains the built-in composition and native Hugging Face VLMs alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message names the file or field and what to do."""


@dataclass
class MediaItem:
    """One decoded media file: the model inputs of that item (per-item tensors; the model's `media_inputs` batches
    them) and the token ids that replace the item's placeholder in the text."""

    inputs: dict[str, torch.Tensor]
    tokens: list[int]


class Processor:
    """Text and media into model inputs, for one backend. Subclasses fill in the methods below."""

    modalities: tuple[str, ...] = ()
    """Modalities this model reads (subset of image, audio, video)."""
    tokenizer: Any = None
    pad_id: int = 0
    eos_ids: list[int] = []
    """Token ids that end an answer (generation stops at the first)."""

    def placeholder_id(self, modality: str) -> int:
        """The single token id that `encode` writes for each item of `modality`."""
        raise NotImplementedError

    def encode(self, conversations: list[dict], for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels of a LLaVA conversation (labels -100 except on the answers and their end-of-turn
        token); with `for_generation`, the prompt up to the last answer (labels all -100). Each `<image>`,
        `<audio>`, `<video>` of the human turns becomes one `placeholder_id` token."""
        raise NotImplementedError

    def load_media(self, modality: str, path: Path) -> MediaItem:
        """Decode one media file into its model inputs and placeholder tokens."""
        raise NotImplementedError

    def decode_answer(self, token_ids: list[int]) -> str:
        """Text of generated ids up to the first end token."""
        ids = list(token_ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


Media = list[dict[str, dict[str, torch.Tensor]]]
"""Per batch row: modality -> that row's item inputs (a text-only row has {})."""


class MLLM(nn.Module):
    """Base of every backend's model. The engine calls `media_inputs` once per batch and then `forward(input_ids,
    attention_mask, **media_kwargs)` (through Accelerate's wrapper) or `generate_new`.

    Every subclass also has `modalities` (the names of the modalities it reads; a mapping keyed by them is fine)
    and a `language_model` attribute or property, settable: the language model module that
    LoRA/IA3 wrap (a PEFT wrapper once wrapped, the plain module again after a merge).
    """

    family: ClassVar[str] = ""
    separable_projector: ClassVar[bool] = True
    """The projector of each modality is its own module (EProj-style strategies need it)."""

    @property
    def capabilities(self) -> frozenset[str]:
        """What strategies may ask of this model beyond the common surface (see `Strategy.requires_model`)."""
        return frozenset({"separable_projector"}) if self.separable_projector else frozenset()

    def parts(self) -> dict[str, dict[str, nn.Module]]:
        """`encoders`, `projectors`, `language_model`: name (modality for encoders/projectors) -> module."""
        raise NotImplementedError

    def part_parameters(self, part: str, modalities: set[str] | None = None) -> list[nn.Parameter]:
        """Parameters of a part; for encoders and projectors only those serving `modalities` (None: all)."""
        modules = self.parts()[part]
        chosen = [m for k, m in modules.items() if modalities is None or part == "language_model" or k in modalities]
        seen: dict[int, nn.Parameter] = {}
        for module in chosen:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def language_model_parameter_names(self) -> set[str]:
        """Full names (as in `named_parameters`) of the language model part's parameters."""
        ids = {id(p) for p in self.part_parameters("language_model")}
        return {n for n, p in self.named_parameters() if id(p) in ids}

    def output_embeddings(self) -> nn.Module | None:
        """The output head (lm_head)."""
        raise NotImplementedError

    def enable_activation_checkpointing(self) -> list[str]:
        """Recompute activations in backward instead of storing them, in every Hugging Face part that supports it
        (non-reentrant, so frozen inputs and PEFT adapters work); returns the classes it was enabled in."""
        done = []
        for module in self.modules():
            if module is not self and getattr(module, "supports_gradient_checkpointing", False) and hasattr(
                    module, "activation_checkpointing_enable") and not getattr(module, "is_activation_checkpointing",
                                                                              False):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                done.append(type(module).__name__)
        return done

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of `forward`/`generate_new` for the batch's media (rows in order)."""
        raise NotImplementedError

    def generate_new(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     **kwargs: Any) -> torch.Tensor:
        """Decode from left-padded prompts; return only the new tokens, shape (B, <= max_new_tokens)."""
        raise NotImplementedError


BackendLoader = Callable[..., tuple[MLLM, Processor]]
_BACKENDS: dict[str, BackendLoader] = {}


def register_backend(*model_types: str) -> Callable[[BackendLoader], BackendLoader]:
    """Register `load(path, *, dtype, allow_pickle, trust_remote_code) -> (model, processor)` for model types."""

    def deco(fn: BackendLoader) -> BackendLoader:
        for t in model_types:
            _BACKENDS[t] = fn
        return fn

    return deco


def backends() -> dict[str, BackendLoader]:
    """model_type -> loader, the native families registered on first use."""
    import mmcl.models.hf  # noqa: F401

    return dict(_BACKENDS)


def refuse_pickles(path: Path, allow_pickle: bool) -> None:
    """A checkpoint directory with only pickle weights is refused unless the user opted in."""
    if allow_pickle:
        return
    pickles = [p.name for p in Path(path).glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    if pickles and not list(Path(path).glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); loading a pickle can run code. "
            "Convert them to safetensors, or opt in with model.allow_pickle=true if you trust the source"
        )


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(rows))
