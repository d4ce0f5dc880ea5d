"""The built-in tiny model: real Hugging Face classes at a size that trains at several steps/s on 2 CPU cores; random
weights here, pre-trained on the built-in world by `mmcl pretrain`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmcl.models.mllm import P4_CUES, ModalitySpec, MultimodalLM
from mmcl.models.tokenizer import ensure_placeholders


@dataclass
class TinySizes:
    """Sizes of the built-in tiny model; the defaults train at several steps/s on 2 CPU cores (batch 16).

    Images: a CLIP-style tower, (image_size / patch_size)^2 patch tokens (64 px, the world's own resolution: at 32 px
    the written words and box edges blur; docs/world.md). Video: `video_frames` frames per clip
    through the same tower, each frame's patch grid average-pooled in `video_pool` x `video_pool` windows. Audio: a
    Whisper-style encoder on `audio_seconds` of 80-bin log-mels (100 frames per second, 50 positions per second),
    average-pooled over `audio_pool` consecutive positions.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    """3 since base recipe 3: from two pre-training seeds, counting 73.75 / 81.25 -> 91.0 / 93.0 and shape 89.75 / 94.0
    -> 92.75 / 93.75 against 2 layers, for about 15 % more pre-training time (docs/results/tower_variants_v4.json)."""
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_positions: int = 256
    audio_hidden: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_seconds: int = 1
    audio_pool: int = 5  # 50 positions per second -> 10 tokens per second
    video_frames: int = 4
    video_pool: int = 4  # 8x8 patch grid -> 2x2 tokens per frame
    adapter: str = "llava"
    """How features reach the LM: "llava" (images: LLaVA's 2-layer MLP; audio/video: average pooling + linear) or
    "p4" (every modality: P4's LayerNorm + learned conv pooling + linear, and P4's cue text " image: " etc.)."""

    def __post_init__(self) -> None:
        if self.adapter not in ("llava", "p4"):
            raise ValueError(f"TinySizes.adapter must be 'llava' or 'p4', got {self.adapter!r}")


TINY_MODALITIES = ("image", "audio", "video")
N_MELS = 80


def _tiny_specs(s: TinySizes) -> dict[str, ModalitySpec]:
    grid = s.image_size // s.patch_size
    per_frame = (grid // s.video_pool) ** 2
    positions = 50 * s.audio_seconds
    p4 = s.adapter == "p4"
    cue = P4_CUES if p4 else {}
    return {
        "image": ModalitySpec("<image>", num_tokens=grid * grid, image_size=s.image_size,
                              projector="p4" if p4 else "mlp2x_gelu", cue=cue.get("image", "")),
        "audio": ModalitySpec("<audio>", num_tokens=positions // s.audio_pool, projector="p4" if p4 else "linear",
                              select="full", pool=s.audio_pool, seconds=s.audio_seconds, n_mels=N_MELS,
                              sampling_rate=16000, cue=cue.get("audio", "")),
        "video": ModalitySpec("<video>", num_tokens=s.video_frames * per_frame, projector="p4" if p4 else "linear",
                              pool=s.video_pool, pool_mode="grid", image_size=s.image_size, encoder="image",
                              frames=s.video_frames, cue=cue.get("video", "")),
    }


def tiny_audio_encoder(s: TinySizes) -> torch.nn.Module:
    """A Whisper encoder sized for `s.audio_seconds` of 80-bin log-mels (Whisper: 2 mel frames per position)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(
        num_mel_bins=N_MELS,
        d_model=s.audio_hidden,
        encoder_layers=s.audio_layers,
        encoder_attention_heads=s.audio_heads,
        encoder_ffn_dim=2 * s.audio_hidden,
        decoder_layers=1,
        decoder_attention_heads=s.audio_heads,
        decoder_ffn_dim=2 * s.audio_hidden,
        max_source_positions=50 * s.audio_seconds,
    )
    return WhisperEncoder(cfg)


def build_tiny(
    tokenizer: PreTrainedTokenizerFast,
    sizes: TinySizes | None = None,
    seed: int = 0,
    modalities: tuple[str, ...] | list[str] = TINY_MODALITIES,
) -> MultimodalLM:
    """A freshly initialised tiny MLLM of real HF classes: LlamaForCausalLM behind a CLIPVisionModel (images, and
    video frames through the same tower) and a WhisperEncoder (audio), for the `modalities` asked for."""
    s = sizes or TinySizes()
    unknown = [m for m in modalities if m not in TINY_MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"build_tiny: modalities must be a non-empty subset of {TINY_MODALITIES}, got {modalities}")
    token_ids = ensure_placeholders(tokenizer)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            max_position_embeddings=s.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    )
    encoders: dict[str, torch.nn.Module] = {}
    if "image" in modalities or "video" in modalities:
        encoders["image"] = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=s.vision_hidden,
                intermediate_size=2 * s.vision_hidden,
                num_hidden_layers=s.vision_layers,
                num_attention_heads=4,
                image_size=s.image_size,
                patch_size=s.patch_size,
            )
        )
    if "audio" in modalities:
        encoders["audio"] = tiny_audio_encoder(s)
    specs = {m: spec for m, spec in _tiny_specs(s).items() if m in modalities}
    return MultimodalLM(lm, encoders, specs, {m: token_ids[m] for m in specs})
