"""Native families: Idefics3 and SmolVLM (tiled images), Qwen2-Audio (audio); BLIP-2 and InstructBLIP live in
`families_blip` and are registered by importing this module.

Each family turns one media file into the model inputs of that item plus the exact token list that the real
Hugging Face processor would put in the text for it, and batches the items of a batch's rows into the keyword
arguments of the model's forward/generate. Only Pillow/numpy preprocessing is used (the `*ImageProcessorPil` classes
and `WhisperFeatureExtractor`): no torchvision, no processor class that owns a video processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.data.media import read_audio, read_image
from mmcl.models.base import Media, MediaItem, ModelLoadError
from mmcl.models.hf import families_blip  # noqa: F401  (registers blip-2 and instructblip)
from mmcl.models.hf.family import Family, register_family


def token_id(tokenizer: Any, token: str, where: Path) -> int:
    """The id of a token the family needs, or a ModelLoadError naming the checkpoint and the missing token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ModelLoadError(f"{where}: the tokenizer has no {token!r} token, which this model family needs; "
                             "use the tokenizer saved with the checkpoint")
    return int(tid)


def _image_prompt_string(rows: int, cols: int, seq_len: int, fake: str, image: str, global_img: str) -> str:
    """The text Idefics3/SmolVLM processors write for one image: per tile `<fake><row_i_col_j><image>*seq_len`,
    a newline after each row of tiles, then the global view `\\n<fake><global-img><image>*seq_len<fake>`; an
    unsplit image is only the global view (without the leading newline). Uses transformers' own helper."""
    try:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
    except ImportError:  # pragma: no cover - the helper moved; same format, written out
        tiles = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{image * seq_len}" for c in range(cols)) + "\n"
                        for r in range(rows))
        single = f"{fake}{global_img}{image * seq_len}{fake}"
        return single if rows == 0 and cols == 0 else f"{tiles}\n{single}"
    return get_image_prompt_string(rows, cols, seq_len, fake_token_around_image=fake, image_token=image,
                                   global_image_token=global_img)


@register_family
class Idefics3Family(Family):
    """Idefics3 (SigLIP tiles -> pixel-shuffle connector -> Llama). An image is resized so its longest edge is the
    image processor's `size`, split into `max_image_size` tiles plus a downscaled global view when the checkpoint's
    `do_image_splitting` is on (else only one view), and each tile becomes `image_seq_len` `<image>` tokens wrapped
    in `<fake_token_around_image>` and `<row_i_col_j>` / `<global-img>` markers, exactly as the real processor
    writes them. Item inputs: `pixel_values` (n_tiles, 3, H, W) and `pixel_attention_mask` (n_tiles, H, W).

    Video is not supported (SmolVLM's video path needs frame timestamps and num2words; not implemented)."""

    model_types: ClassVar[tuple[str, ...]] = ("idefics3",)
    model_class: ClassVar[str] = "Idefics3ForConditionalGeneration"
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    language_model_path: ClassVar[tuple[str, ...]] = ("model", "text_model")
    image_processor_class: ClassVar[str] = "Idefics3ImageProcessorPil"

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        import transformers

        try:
            self.image_processor = getattr(transformers, self.image_processor_class).from_pretrained(str(path))
        except OSError as e:
            raise ModelLoadError(f"{path}: no readable preprocessor_config.json for the image processor ({e})") from e
        vision = config.vision_config
        # What the connector yields per tile; the real processor's `image_seq_len` must equal it.
        self.image_seq_len = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor ** 2)
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.fake_token = getattr(tokenizer, "fake_image_token", None) or "<fake_token_around_image>"
        self.global_token = getattr(tokenizer, "global_image_token", None) or "<global-img>"
        self.image_id = token_id(tokenizer, self.image_token, self.path)
        if self.image_id != config.image_token_id:
            raise ModelLoadError(f"{path}: the tokenizer's {self.image_token!r} is id {self.image_id} but config.json "
                                 f"has image_token_id={config.image_token_id}")
        for t in (self.fake_token, self.global_token):
            token_id(tokenizer, t, self.path)

    def placeholder_token(self, modality: str) -> str:
        return self.image_token

    def load_media(self, modality: str, path: Path) -> MediaItem:
        out = self.image_processor(images=[[read_image(path)]], return_tensors="pt", return_row_col_info=True)
        pixels = out["pixel_values"][0]
        mask = out.get("pixel_attention_mask")  # absent when the checkpoint turns do_pad off
        mask = mask[0].bool() if mask is not None else torch.ones(pixels.shape[0], *pixels.shape[-2:]).bool()
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        text = _image_prompt_string(rows, cols, self.image_seq_len, self.fake_token, self.image_token,
                                    self.global_token)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokens.count(self.image_id) != self.image_seq_len * pixels.shape[0]:
            raise ModelLoadError(f"{self.path}: the tokenizer splits the image markers of {path} wrongly "
                                 "(<row_i_col_j> and <global-img> must be single tokens)")
        return MediaItem({"pixel_values": pixels, "pixel_attention_mask": mask}, tokens)

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """Image rows only, in row order (the model scatters the tiles' features over the `<image>` tokens in
        order), padded to the batch's largest tile count with all-zero tiles, which the model drops, as the real
        processor pads. No image in the batch: no pixel inputs (the text model alone runs)."""
        items = [row["image"] for row in media if "image" in row]
        if not items:
            return {}
        first = items[0]["pixel_values"]
        n = max(i["pixel_values"].shape[0] for i in items)
        h = max(i["pixel_values"].shape[-2] for i in items)
        w = max(i["pixel_values"].shape[-1] for i in items)
        pixels = first.new_zeros(len(items), n, first.shape[1], h, w)
        mask = torch.zeros(len(items), n, h, w, dtype=torch.bool, device=first.device)
        for k, item in enumerate(items):
            p, m = item["pixel_values"], item["pixel_attention_mask"]
            pixels[k, : p.shape[0], :, : p.shape[-2], : p.shape[-1]] = p
            mask[k, : m.shape[0], : m.shape[-2], : m.shape[-1]] = m.bool()
        return {"pixel_values": pixels, "pixel_attention_mask": mask}

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        inner = model.model
        return {"encoders": {"image": inner.vision_model}, "projectors": {"image": inner.connector},
                "language_model": {"lm": inner.text_model, "head": model.lm_head}}


@register_family
class SmolVLMFamily(Idefics3Family):
    """SmolVLM: Idefics3's image format and layout (SmolVLM's own image processor and markers); images only."""

    model_types: ClassVar[tuple[str, ...]] = ("smolvlm",)
    model_class: ClassVar[str] = "SmolVLMForConditionalGeneration"
    image_processor_class: ClassVar[str] = "SmolVLMImageProcessorPil"


@register_family
class Qwen2AudioFamily(Family):
    """Qwen2-Audio (Whisper-style encoder + average pooling -> Qwen2). A file is read at the feature extractor's
    sampling rate, padded/cut to its window (`chunk_length` seconds; the encoder needs exactly
    2 * max_source_positions mel frames) and becomes `input_features` (n_mels, frames) and `feature_attention_mask`
    (frames,); its placeholder `<|AUDIO|>` is repeated once per encoder output frame of the real (unpadded) part:
    L mel frames -> ((L - 1) // 2 + 1 - 2) // 2 + 1 tokens (100 frames -> 25), as the real processor counts."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_audio",)
    model_class: ClassVar[str] = "Qwen2AudioForConditionalGeneration"
    modalities: ClassVar[tuple[str, ...]] = ("audio",)
    language_model_path: ClassVar[tuple[str, ...]] = ("model", "language_model")

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        from transformers import WhisperFeatureExtractor

        try:
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
        except OSError as e:
            raise ModelLoadError(f"{path}: no readable preprocessor_config.json for the audio features ({e})") from e
        want = 2 * config.audio_config.max_source_positions
        if self.feature_extractor.nb_max_frames != want:
            raise ModelLoadError(
                f"{path}: the feature extractor makes {self.feature_extractor.nb_max_frames} mel frames per window "
                f"but the audio encoder needs exactly {want} (2 x max_source_positions); fix chunk_length in "
                "preprocessor_config.json")
        self.audio_token = getattr(tokenizer, "audio_token", None) or "<|AUDIO|>"
        self.audio_id = token_id(tokenizer, self.audio_token, self.path)
        if self.audio_id != config.audio_token_id:
            raise ModelLoadError(f"{path}: the tokenizer's {self.audio_token!r} is id {self.audio_id} but config.json "
                                 f"has audio_token_index={config.audio_token_id}")
        self.bos = getattr(tokenizer, "audio_bos_token", None) or "<|audio_bos|>"
        self.eos = getattr(tokenizer, "audio_eos_token", None) or "<|audio_eos|>"

    def placeholder_token(self, modality: str) -> str:
        return self.audio_token

    def content_item(self, modality: str) -> dict:
        """The real template writes `Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>` for entries with an `audio` or
        `audio_url` key (its value is not read when rendering)."""
        return {"type": "audio", "audio_url": ""}

    def fallback_placeholder_text(self, modality: str) -> str:
        return f"{self.bos}{self.audio_token}{self.eos}"

    def load_media(self, modality: str, path: Path) -> MediaItem:
        fe = self.feature_extractor
        wave = read_audio(path, fe.sampling_rate)
        out = fe(wave, sampling_rate=fe.sampling_rate, return_attention_mask=True, padding="max_length",
                 return_tensors="pt")
        mask = out["attention_mask"][0].long()
        frames = int(mask.sum())
        n = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        if n < 2:
            # One token would send the model down its legacy (unexpanded) merge path.
            raise ValueError(f"audio file {path} is too short ({frames} mel frames); at least 50 ms are needed")
        return MediaItem({"input_features": out["input_features"][0], "feature_attention_mask": mask},
                         [self.audio_id] * n)

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        """Audio rows only, in row order (features are scattered over the `<|AUDIO|>` tokens in order); windows
        all have the same length. No audio in the batch: nothing (the language model alone runs)."""
        items = [row["audio"] for row in media if "audio" in row]
        if not items:
            return {}
        return {"input_features": torch.stack([i["input_features"] for i in items]),
                "feature_attention_mask": torch.stack([i["feature_attention_mask"] for i in items])}

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        inner = model.model
        return {"encoders": {"audio": inner.audio_tower}, "projectors": {"audio": inner.multi_modal_projector},
                "language_model": {"lm": inner.language_model, "head": model.lm_head}}
