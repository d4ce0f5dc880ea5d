"""Native families BLIP-2 and InstructBLIP (P3's backbones): a ViT, a Q-Former that turns the image into
`num_query_tokens` vectors (learned query tokens cross-attending to the ViT output; InstructBLIP's Q-Former also reads
the instruction text), a linear `language_projection`, and a decoder-only causal LM (OPT, Llama/Vicuna, ...).

How transformers 5.x runs them: the text carries `num_query_tokens` copies of the image token
(`config.image_token_index`) per image and the projected query outputs are scattered over them in order
(`masked_scatter`, with no count check), so item tokens are `[image_token_id] * num_query_tokens`. The real
processors put those tokens before BOS; mmcl puts them where the conversation has its `<image>` (the model does not
care where they are). Neither family has a chat template, so mmcl's plain USER/ASSISTANT fallback is used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.data.media import read_image
from mmcl.models.base import Media, MediaItem, ModelLoadError
from mmcl.models.hf.family import Family, register_family

_USER_TURN = re.compile(r"(?im)^\s*(user|human)\s*:")
_ASSISTANT_TURN = re.compile(r"(?im)^\s*(assistant|gpt)\s*:")


class QFormerProjector(nn.Module):
    """The projector part of a BLIP model as one module: `query_tokens` (the top model's own nn.Parameter, the same
    object, so it trains, freezes and is saved with the model), `qformer` and `language_projection`. Only groups
    parameters for `parts()`; the model's forward runs them. Not registered inside the model (no duplicate names)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a parameter group; the BLIP model runs the Q-Former itself")


@register_family
class Blip2Family(Family):
    """BLIP-2. Images: `BlipImageProcessorPil` (resize to the ViT size, normalise) -> item `pixel_values` (3, H, W).

    Text-only rows: in a batch with images they simply carry no image tokens (only image rows' pixels are passed,
    in row order). A batch without any image cannot run through the HF classes (their forward and generate always
    run the ViT on `pixel_values`, and an empty image batch crashes the Q-Former); `media_inputs` then passes, when
    gradients are on (training), no pixels and an empty precomputed image-feature output (`mm_encoder_outputs`), so
    only the language model runs and the towers get no gradient; under no_grad (evaluation, generation: BLIP's
    `generate` has no such argument) it passes one blank image whose features land nowhere (no image tokens).
    """

    model_types: ClassVar[tuple[str, ...]] = ("blip-2",)
    model_class: ClassVar[str] = "Blip2ForConditionalGeneration"
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    language_model_path: ClassVar[tuple[str, ...]] = ("language_model",)

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        from transformers import BlipImageProcessorPil

        if not getattr(config, "use_decoder_only_language_model", True):
            raise ModelLoadError(f"{path}: {config.text_config.model_type} is an encoder-decoder language model; "
                                 "mmcl runs BLIP models with decoder-only language models only")
        if config.image_token_index is None:
            raise ModelLoadError(f"{path}: config.json has no image_token_index (a checkpoint from before "
                                 "transformers expanded image tokens); set it to the tokenizer's <image> token id")
        self.image_id = int(config.image_token_index)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_id)
        if self.image_token is None or tokenizer.convert_tokens_to_ids(self.image_token) != self.image_id:
            raise ModelLoadError(f"{path}: image_token_index={self.image_id} is not a token of the tokenizer")
        self.num_query_tokens = int(config.num_query_tokens)
        try:
            self.image_processor = BlipImageProcessorPil.from_pretrained(str(path))
        except OSError as e:
            raise ModelLoadError(f"{path}: no readable preprocessor_config.json for the image processor ({e})") from e

    def placeholder_token(self, modality: str) -> str:
        return self.image_token

    def load_media(self, modality: str, path: Path) -> MediaItem:
        pixels = self.image_processor(images=read_image(path), return_tensors="pt")["pixel_values"][0]
        return MediaItem({"pixel_values": pixels}, [self.image_id] * self.num_query_tokens)

    def _check_tokens(self, media: Media, input_ids: torch.Tensor) -> None:
        """BLIP's masked_scatter does not check counts: a row whose image tokens do not match its image would
        silently take another row's features, so refuse it here."""
        counts = (input_ids == self.image_id).sum(dim=1).tolist()
        for r, (row, n) in enumerate(zip(media, counts)):
            want = self.num_query_tokens if "image" in row else 0
            if n != want:
                raise ValueError(f"batch row {r} has {n} image tokens, expected {want} "
                                 f"({self.num_query_tokens} per image)")

    def _image_inputs(self, items: list[dict[str, torch.Tensor]], rows: list[int], input_ids: torch.Tensor) -> dict:
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items])}

    def _text_only_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        if torch.is_grad_enabled():
            from transformers.models.blip_2.modeling_blip_2 import BaseModelOutputWithVisionQformerOutputs

            empty = torch.zeros(0, self.num_query_tokens, self.config.text_config.hidden_size, device=input_ids.device)
            return {"pixel_values": None,
                    "mm_encoder_outputs": {"image": BaseModelOutputWithVisionQformerOutputs(pooler_output=empty)}}
        size = self.config.vision_config.image_size
        return {"pixel_values": torch.zeros(1, 3, size, size, device=input_ids.device)}

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """`pixel_values` of the image rows in row order (plus the InstructBLIP Q-Former text); see the class
        docstring for a batch without images."""
        self._check_tokens(media, input_ids)
        rows = [r for r, row in enumerate(media) if "image" in row]
        if not rows:
            return self._text_only_inputs(input_ids)
        return self._image_inputs([media[r]["image"] for r in rows], rows, input_ids)

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        """The language model is a full causal LM: its lm_head lives inside it."""
        return {"encoders": {"image": model.vision_model}, "projectors": {"image": QFormerProjector(model)},
                "language_model": {"lm": model.language_model}}


@register_family
class InstructBlipFamily(Blip2Family):
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, tokenized by the Q-Former's own BERT-style
    tokenizer (saved by InstructBlipProcessor in `qformer_tokenizer/`).

    The instruction of a row is read back from the row's own token ids in `media_inputs` (so it is always the
    row's, whatever `Batch.select`/`concat` did): the text of the human turn holding the image, i.e. the text
    before the image tokens after the last `USER:`/`Human:` line start, plus the text after them up to the next
    `ASSISTANT:`/`GPT:` line start (special tokens dropped). The answer is never included, so training and
    generation give the Q-Former the same text, as the real processor does (it is given the prompt only)."""

    model_types: ClassVar[tuple[str, ...]] = ("instructblip",)
    model_class: ClassVar[str] = "InstructBlipForConditionalGeneration"

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        from transformers import AutoTokenizer

        sub = Path(path) / "qformer_tokenizer"
        if not sub.is_dir():
            raise ModelLoadError(f"{path}: no qformer_tokenizer/ folder (InstructBlipProcessor.save_pretrained "
                                 "writes the Q-Former's tokenizer there)")
        self.qformer_tokenizer = AutoTokenizer.from_pretrained(str(sub))
        self.qformer_max = int(config.qformer_config.max_position_embeddings)

    def instruction(self, ids: list[int]) -> str:
        """The instruction text of one row (see the class docstring)."""
        where = [k for k, t in enumerate(ids) if t == self.image_id]
        if not where:
            return ""
        dec = self.tokenizer.decode
        before = dec(ids[: where[0]], skip_special_tokens=True)
        after = dec(ids[where[-1] + 1 :], skip_special_tokens=True)
        starts = list(_USER_TURN.finditer(before))
        if starts:
            before = before[starts[-1].end() :]
        end = _ASSISTANT_TURN.search(after)
        if end:
            after = after[: end.start()]
        return " ".join(p.strip() for p in (before, after) if p.strip())

    def _image_inputs(self, items: list[dict[str, torch.Tensor]], rows: list[int], input_ids: torch.Tensor) -> dict:
        texts = [self.instruction(input_ids[r].tolist()) for r in rows]
        q = self.qformer_tokenizer(texts, padding=True, truncation=True, max_length=self.qformer_max,
                                   return_tensors="pt", return_token_type_ids=False)
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
                "qformer_input_ids": q["input_ids"].to(input_ids.device),
                "qformer_attention_mask": q["attention_mask"].to(input_ids.device)}

    def _text_only_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        out = super()._text_only_inputs(input_ids)
        if out["pixel_values"] is None:
            return {**out, "qformer_input_ids": None}
        q = self.qformer_tokenizer([""], return_tensors="pt", return_token_type_ids=False)
        return {**out, "qformer_input_ids": q["input_ids"].to(input_ids.device),
                "qformer_attention_mask": q["attention_mask"].to(input_ids.device)}
