"""What differs between native Hugging Face VLM families. `native.py` does everything the families share (chat
template -> ids and labels, media expansion, forward, generate, parts, LoRA targets); a family says only how its
media become model inputs and where its parts live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.models.base import Media, MediaItem

FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    for t in cls.model_types:
        FAMILIES[t] = cls
    return cls


class Family:
    """One native family. Subclasses set the class attributes and implement the methods.

    Built once per checkpoint directory with its config and tokenizer; loads its own image processor / feature
    extractor from the directory with the `*Pil` / numpy classes (never torchvision, never a processor class that
    owns a video processor).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    """`config.json` model_type values this family loads."""
    model_class: ClassVar[str] = ""
    """transformers class name, e.g. "Qwen2VLForConditionalGeneration"."""
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    """What it reads: image (all), video (families that read video), audio (Qwen2-Audio)."""
    language_model_path: ClassVar[tuple[str, ...]] = ("model", "language_model")
    """Attribute path from the HF model to the language model module (what LoRA/IA3 wrap)."""
    separable_projector: ClassVar[bool] = True

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        self.path, self.config, self.tokenizer = Path(path), config, tokenizer

    def placeholder_token(self, modality: str) -> str:
        """The token (as text) that the chat template writes once per item and the model expects repeated once per
        feature, e.g. "<image>" (LLaVA) or "<|image_pad|>" (Qwen2-VL)."""
        raise NotImplementedError

    def content_item(self, modality: str) -> dict:
        """The chat-message content entry for one item, e.g. {"type": "image"}."""
        return {"type": modality}

    def fallback_placeholder_text(self, modality: str) -> str:
        """What to write for one item when the checkpoint has no chat template (mmcl's plain USER/ASSISTANT format
        is used then): by default the placeholder token itself."""
        return self.placeholder_token(modality)

    def load_media(self, modality: str, path: Path) -> MediaItem:
        """Decode and preprocess one file (mmcl.data.media readers + this family's processor): per-item model inputs
        and the tokens replacing the placeholder (usually `[placeholder_id] * n_features`, maybe with markers)."""
        raise NotImplementedError

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """Batch the rows' items into the model's keyword arguments (pixel_values, image_grid_thw,
        mm_token_type_ids, pixel_attention_mask, input_features, ...). Rows without media contribute nothing."""
        raise NotImplementedError

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        """encoders / projectors keyed by modality (shared modules may repeat), language_model keyed "lm" (plus
        "head" for a top-level lm_head)."""
        raise NotImplementedError
