"""Native families LLaVA-1.5, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL: how their media become model inputs and how
many placeholder tokens each item needs (computed exactly as the model counts its features), and where their
encoders, projectors and language model live. Pillow image processors only; video tensors are built here from
frames read by `mmcl.data.media`, since transformers' video processors need torchvision."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcl.data.media import read_image, read_video_frames
from mmcl.models.base import Media, MediaItem, ModelLoadError
from mmcl.models.hf.family import Family, register_family

DEFAULT_VIDEO_FRAMES = 4
"""Frames sampled per video when the checkpoint's processor configs name no `num_frames` (even, so Qwen's two-frame
temporal patches need no padding)."""


def load_image_processor(path: Path, default: str) -> Any:
    """The checkpoint's image processor as its Pillow class (`<type>Pil`, e.g. CLIPImageProcessorPil), falling back
    to `default` when preprocessor_config.json names a type without one."""
    import transformers

    file = path / "preprocessor_config.json"
    if not file.is_file():
        raise ModelLoadError(f"{path} has no preprocessor_config.json; save the processor next to the model with "
                             "processor.save_pretrained(dir)")
    name = str(json.loads(file.read_text()).get("image_processor_type") or default).removesuffix("Fast")
    name = name if name.endswith("Pil") else name + "Pil"
    cls = getattr(transformers, name, None) or getattr(transformers, default)
    return cls.from_pretrained(path)


def video_settings(path: Path) -> dict:
    """Video preprocessing settings a checkpoint saved (video_preprocessor_config.json, else the "video_processor"
    entry of processor_config.json); {} when none."""
    file = path / "video_preprocessor_config.json"
    if file.is_file():
        return json.loads(file.read_text())
    file = path / "processor_config.json"
    if file.is_file():
        data = json.loads(file.read_text()).get("video_processor")
        if isinstance(data, dict):
            return data
    return {}


def _rows(media: Media, modality: str) -> list[dict[str, torch.Tensor]]:
    return [row[modality] for row in media if modality in row]


class _LlavaBase(Family):
    """Shared by LLaVA and OneVision: one vision tower + multi_modal_projector in front of the language model."""

    def placeholder_token(self, modality: str) -> str:
        token_id = self.config.image_token_id if modality == "image" else self.config.video_token_id
        return self.tokenizer.convert_ids_to_tokens(token_id)

    def _pid(self, modality: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.placeholder_token(modality))

    def _projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        tower, proj = model.model.vision_tower, self._projector(model)
        return {"encoders": {m: tower for m in self.modalities}, "projectors": {m: proj for m in self.modalities},
                "language_model": {"lm": model.model.language_model, "head": model.lm_head}}


@register_family
class LlavaFamily(_LlavaBase):
    """LLaVA-1.5 (llava-hf/llava-1.5-*): a CLIP tower at a fixed square size, (size/patch)^2 image tokens (plus the
    CLS position with vision_feature_select_strategy "full")."""

    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    modalities = ("image",)

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        self.image_processor = load_image_processor(self.path, "CLIPImageProcessorPil")
        vc = config.vision_config
        has_cls = vc.model_type in ("clip_vision_model", "clip")
        self.num_image_tokens = (vc.image_size // vc.patch_size) ** 2 + int(has_cls) - int(
            config.vision_feature_select_strategy == "default")

    def load_media(self, modality: str, path: Path) -> MediaItem:
        pixels = self.image_processor(images=[read_image(path)], return_tensors="pt")["pixel_values"][0]
        return MediaItem({"pixel_values": pixels}, [self._pid("image")] * self.num_image_tokens)

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        rows = _rows(media, "image")
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows])} if rows else {}


class _Newline(nn.Module):
    """OneVision's projector and its learned `image_newline` vector as one module (not registered on the model), so
    projector-only training and freezing reach the newline too."""

    def __init__(self, projector: nn.Module, newline: nn.Parameter) -> None:
        super().__init__()
        self.projector = projector
        self.image_newline = newline


@register_family
class LlavaOnevisionFamily(_LlavaBase):
    """LLaVA-OneVision: anyres tiling for one image per row (base tile + best-fit grid, unpadded, one newline per row
    of features) and pooled video frames (ceil(side/2)^2 features per frame + one newline)."""

    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    modalities = ("image", "video")

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        self.image_processor = load_image_processor(self.path, "LlavaOnevisionImageProcessorPil")
        self.video_frames = int(video_settings(self.path).get("num_frames") or DEFAULT_VIDEO_FRAMES)
        vc = config.vision_config
        self.tile = vc.image_size
        self.side = vc.image_size // vc.patch_size

    def _projector(self, model: nn.Module) -> nn.Module:
        return _Newline(model.model.multi_modal_projector, model.model.image_newline)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Features the model packs for one image of this size (LlavaOnevisionModel.pack_image_features)."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        cur_h, cur_w = best_h // self.tile * self.side, best_w // self.tile * self.side
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= (cur_h - new_h) // 2 * 2
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= (cur_w - new_w) // 2 * 2
        max_tiles = int(self.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(cur_h * cur_w / (max_tiles * self.side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        return self.side**2 + cur_h * (cur_w + 1)

    def num_video_tokens(self, frames: int) -> int:
        return frames * math.ceil(self.side / 2) ** 2 + 1

    def load_media(self, modality: str, path: Path) -> MediaItem:
        if modality == "video":
            frames = read_video_frames(path, self.video_frames)
            pixels = torch.stack([_square_frame(self.image_processor, f, self.tile) for f in frames])
            tokens = [self._pid("video")] * self.num_video_tokens(len(frames))
            return MediaItem({"pixel_values_videos": pixels}, tokens)
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        im = read_image(path)
        out = self.image_processor(images=[im], return_tensors="pt")
        size = (im.height, im.width)
        tiles = image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.tile)
        if out["pixel_values"].shape[1] != tiles:
            raise ModelLoadError(f"{self.path}/preprocessor_config.json makes {out['pixel_values'].shape[1]} tiles of "
                                 f"a {size} image, the model expects {tiles}: its image_grid_pinpoints and size must "
                                 "match config.json's image_grid_pinpoints and vision_config.image_size")
        return MediaItem({"pixel_values": out["pixel_values"][0], "image_sizes": torch.tensor(size)},
                         [self._pid("image")] * self.num_image_tokens(*size))

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = _rows(media, "image")
        if images:  # tiles of all images concatenated; the model splits them by image_sizes
            out["pixel_values"] = torch.cat([r["pixel_values"] for r in images])
            out["image_sizes"] = torch.stack([r["image_sizes"] for r in images])
        videos = _rows(media, "video")
        if videos:
            out["pixel_values_videos"] = torch.stack([r["pixel_values_videos"] for r in videos])
        return out


def _square_frame(processor: Any, frame: Any, size: int) -> torch.Tensor:
    """One video frame resized to size x size, rescaled and normalised with the image processor's settings (what
    transformers' OneVision video processor does, without torchvision)."""
    from transformers.image_utils import SizeDict

    arr = np.asarray(frame.convert("RGB")).transpose(2, 0, 1)
    arr = processor.resize(arr, SizeDict(height=size, width=size), resample=processor.resample)
    arr = processor.rescale(arr, processor.rescale_factor)
    arr = processor.normalize(arr, processor.image_mean, processor.image_std)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


@register_family
class Qwen2VLFamily(Family):
    """Qwen2-VL: dynamic resolution; an image of grid (t, h, w) patches needs t*h*w / merge^2 `<|image_pad|>` tokens
    (the template writes the <|vision_start|>/<|vision_end|> markers); video frames go in temporal_patch_size
    groups. The patch merger is the projector but lives inside the vision module (`visual.merger`)."""

    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    modalities = ("image", "video")
    separable_projector = False

    def __init__(self, path: Path, config: Any, tokenizer: Any) -> None:
        super().__init__(path, config, tokenizer)
        self.image_processor = load_image_processor(self.path, "Qwen2VLImageProcessorPil")
        video = video_settings(self.path)
        self.video_frames = int(video.get("num_frames") or DEFAULT_VIDEO_FRAMES)
        self.video_size = video.get("size")
        self.video_fps = float(video.get("fps") or 2.0)
        self.merge = self.image_processor.merge_size
        self.tps = self.image_processor.temporal_patch_size

    def placeholder_token(self, modality: str) -> str:
        token_id = self.config.image_token_id if modality == "image" else self.config.video_token_id
        return self.tokenizer.convert_ids_to_tokens(token_id)

    def _pid(self, modality: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.placeholder_token(modality))

    def load_media(self, modality: str, path: Path) -> MediaItem:
        if modality == "video":
            return self._video(path)
        out = self.image_processor(images=[read_image(path)], return_tensors="pt")
        grid = out["image_grid_thw"][0]
        n = int(grid.prod()) // self.merge**2
        return MediaItem({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, [self._pid("image")] * n)

    def _video(self, path: Path) -> MediaItem:
        """Frames through the image processor (same resize and normalisation), then regrouped the way Qwen's video
        processor patchifies: temporal_patch_size consecutive frames per temporal patch (the last frame repeated to
        fill a group)."""
        frames = read_video_frames(path, self.video_frames)
        frames += [frames[-1]] * (-len(frames) % self.tps)
        kwargs = {"size": self.video_size} if self.video_size else {}
        out = self.image_processor(images=frames, return_tensors="pt", **kwargs)
        grids = out["image_grid_thw"]
        _, gh, gw = (int(x) for x in grids[0])
        n = gh * gw
        p = self.image_processor.patch_size
        # each frame's patches hold the frame repeated tps times along the temporal axis: keep one copy
        per_frame = out["pixel_values"].view(len(frames), n, 3, self.tps, p, p)[:, :, :, 0]
        groups = per_frame.view(len(frames) // self.tps, self.tps, n, 3, p, p).permute(0, 2, 3, 1, 4, 5)
        pixels = groups.reshape(len(frames) // self.tps * n, 3 * self.tps * p * p)
        grid = torch.tensor([len(frames) // self.tps, gh, gw])
        inputs = {"pixel_values_videos": pixels, "video_grid_thw": grid}
        inputs.update(self._video_extras())
        return MediaItem(inputs, [self._pid("video")] * (int(grid.prod()) // self.merge**2))

    def _video_extras(self) -> dict[str, torch.Tensor]:
        return {}

    def media_inputs(self, media: Media, input_ids: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for modality, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            rows = _rows(media, modality)
            if rows:
                out[pixels] = torch.cat([r[pixels] for r in rows])
                out[grid] = torch.stack([r[grid] for r in rows])
                if "second_per_grid_ts" in rows[0]:
                    out["second_per_grid_ts"] = torch.stack([r["second_per_grid_ts"] for r in rows])
        if out:  # M-RoPE needs to know which positions are image (1) and video (2) tokens
            ids = input_ids
            out["mm_token_type_ids"] = ((ids == self._pid("image")).int() + 2 * (ids == self._pid("video")).int())
        return out

    def parts(self, model: nn.Module) -> dict[str, dict[str, nn.Module]]:
        visual = model.model.visual
        return {"encoders": {m: visual for m in self.modalities},
                "projectors": {m: visual.merger for m in self.modalities},
                "language_model": {"lm": model.model.language_model, "head": model.lm_head}}


@register_family
class Qwen2_5VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: as Qwen2-VL, plus each video's seconds per temporal patch (temporal_patch_size / fps, fps 2 unless
    the checkpoint's video config says otherwise) for its time-aligned M-RoPE."""

    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def _video_extras(self) -> dict[str, torch.Tensor]:
        return {"second_per_grid_ts": torch.tensor(self.tps / self.video_fps)}
