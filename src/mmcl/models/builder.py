"""Build, save and load the multimodal LLM.

Four ways in, one class out (`MultimodalLM`):
- `build_tiny`: the built-in tiny model (CLIP-style vision tower for images and video frames, Whisper-style audio
  encoder, Llama), random weights, for `mmcl pretrain`;
- an mmcl model directory (`mmcl_model.json` + one Hugging Face checkpoint per part), as written by `save_model`;
- `assemble_model`: separately saved Hugging Face parts (a causal LM, vision/audio towers) composed into one model;
- a Hugging Face `LlavaForConditionalGeneration` checkpoint directory, mapped part by part onto the composition.
The media decoders (`load_image`, `load_audio`, `load_video`) turn files into encoder inputs.
Loading is safetensors-only unless the caller opts in to pickles, and never runs remote code unless asked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from mmcl.models.mllm import P4_CUES, ModalitySpec, MultimodalLM
from mmcl.models.tokenizer import PLACEHOLDERS, ConversationFormat, ensure_placeholders

FORMAT = "mmcl-mllm"


@dataclass
class TinySizes:
    """Sizes of the built-in tiny model; the defaults train at ~10 steps/s on 2 CPU cores (batch 16).

    Images: a CLIP-style tower, (image_size / patch_size)^2 patch tokens. Video: `video_frames` frames per clip
    through the same tower, each frame's patch grid average-pooled in `video_pool` x `video_pool` windows. Audio: a
    Whisper-style encoder on `audio_seconds` of 80-bin log-mels (100 frames per second, 50 positions per second),
    average-pooled over `audio_pool` consecutive positions.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
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
    video_pool: int = 2  # 4x4 patch grid -> 2x2 tokens per frame
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


# -- save / load ------------------------------------------------------------------------------------------------------


def save_model(model: MultimodalLM, tokenizer: PreTrainedTokenizerFast, path: Path, extra: dict | None = None) -> None:
    """Write an mmcl model directory: one HF checkpoint per part, projectors in safetensors, a JSON index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):
        raise ValueError("save_model expects a plain language model; merge or unload the PEFT adapter first")
    lm.save_pretrained(path / "language_model")
    for name, enc in model.encoders.items():
        enc.save_pretrained(path / "encoders" / name)
    tensors = {f"{m}.{k}": v.detach().contiguous() for m, p in model.projectors.items() for k, v in p.state_dict().items()}
    save_file(tensors, str(path / "projectors.safetensors"))
    tokenizer.save_pretrained(path / "tokenizer")
    index = {
        "format": FORMAT,
        "version": 1,
        "modalities": model.spec_dict(),
        "encoders": {name: type(enc).__name__ for name, enc in model.encoders.items()},
        **(extra or {}),
    }
    (path / "mmcl_model.json").write_text(json.dumps(index, indent=2) + "\n")


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Load an mmcl model directory or a LLaVA checkpoint directory (safetensors only unless `allow_pickle`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {path} is not a directory: give an mmcl model directory (from `mmcl pretrain`) or a local "
            "Hugging Face LLaVA checkpoint directory (hub ids are not fetched: download the checkpoint first)"
        )
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    if (path / "mmcl_model.json").exists():
        return _load_mmcl(path, opts)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") == "llava":
            return _load_llava(path, opts)
        raise ValueError(
            f"{path}/config.json: model_type {cfg.get('model_type')!r} is not supported yet; supported: an mmcl "
            "model directory, or a LLaVA (model_type 'llava') checkpoint"
        )
    raise FileNotFoundError(f"{path}: neither mmcl_model.json nor config.json found; is this a model directory?")


def _refuse_pickles(path: Path, opts: dict) -> None:
    if opts["use_safetensors"]:
        pickles = [p.name for p in path.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        if pickles and not list(path.glob("*.safetensors")):
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); loading a pickle can run code. "
                "Convert them to safetensors, or opt in with model.allow_pickle=true if you trust the source"
            )


def _load_mmcl(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    index = json.loads((path / "mmcl_model.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}/mmcl_model.json: format {index.get('format')!r} is not {FORMAT!r}")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    modalities = {m: ModalitySpec.from_dict(s) for m, s in index["modalities"].items()}
    # encoder name -> class name; directories written before audio/video have no map and load with AutoModel
    classes: dict[str, str | None] = index.get("encoders") or {
        name: None for name in dict.fromkeys(s.encoder or m for m, s in modalities.items())
    }
    for part in [path / "language_model", *[path / "encoders" / name for name in classes]]:
        _refuse_pickles(part, opts)
    lm = AutoModelForCausalLM.from_pretrained(path / "language_model", **opts)
    encoders = {name: _load_encoder_dir(path / "encoders" / name, cls, opts) for name, cls in classes.items()}
    token_ids = ensure_placeholders(tokenizer)
    model = MultimodalLM(lm, encoders, modalities, {m: token_ids[m] for m in modalities})
    state = load_file(str(path / "projectors.safetensors"))
    for m, proj in model.projectors.items():
        proj.load_state_dict({k[len(m) + 1 :]: v for k, v in state.items() if k.startswith(m + ".")})
    return model.to(opts["dtype"]), tokenizer


def encoder_class(name: str) -> type[PreTrainedModel]:
    """A Hugging Face model class by name, from `transformers` or its Whisper module (where `WhisperEncoder` lives);
    anything else, or a name that is not a `PreTrainedModel` class, is refused (a model file never names code)."""
    from transformers.models.whisper import modeling_whisper

    cls = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):
        cls = getattr(transformers, name, None) or getattr(modeling_whisper, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(
            f"unknown encoder class {name!r}: it must be a transformers model class (e.g. CLIPVisionModel, "
            "SiglipVisionModel, Dinov2Model, WhisperEncoder)"
        )
    return cls


def _load_encoder_dir(path: Path, class_name: str | None, opts: dict) -> torch.nn.Module:
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {path} not found")
    if class_name is None:
        return AutoModel.from_pretrained(path, **opts)
    return encoder_class(class_name).from_pretrained(path, **opts)


def load_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> PreTrainedModel:
    """An encoder tower from a local Hugging Face checkpoint directory.

    The class comes from the checkpoint's `architectures` (looked up with `encoder_class`, AutoModel if none is
    named); of an encoder-decoder checkpoint (a `WhisperModel` or `WhisperForConditionalGeneration`) only the encoder
    is kept. Dual encoders such as `CLIPModel` are refused: save their tower (`CLIPVisionModel`) instead.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; give a local Hugging Face checkpoint directory")
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    _refuse_pickles(path, opts)
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    model = _load_encoder_dir(path, archs[0] if archs else None, opts)
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        raise ValueError(
            f"{path} holds a dual encoder ({type(model).__name__}); save its vision tower on its own "
            "(e.g. CLIPVisionModel.from_pretrained(path).save_pretrained(tower_dir)) and give that directory"
        )
    return model


def check_num_tokens(model: MultimodalLM) -> None:
    """Run each modality's encoder on one blank input and check it yields the spec's `num_tokens` features."""
    was_training = model.training
    model.eval()
    try:
        for m, spec in model.modalities.items():
            param = next(model.encoder_for(m).parameters())
            if m == "audio":
                blank = torch.zeros(1, spec.n_mels, spec.seconds * spec.sampling_rate // HOP_LENGTH)
            else:
                blank = torch.zeros(1, 3, spec.image_size, spec.image_size)
                if spec.frames:
                    blank = blank[:, None].expand(1, spec.frames, 3, spec.image_size, spec.image_size)
            try:
                with torch.no_grad():
                    got = model.encoder_features(m, blank.to(param.device, param.dtype)).shape[1]
            except Exception as e:
                raise ValueError(f"{m}: the {type(model.encoder_for(m)).__name__} encoder does not accept the "
                                 f"spec's input {tuple(blank.shape)} ({type(e).__name__}: {e})") from e
            if got != spec.num_tokens:
                raise ValueError(f"{m}: the spec says num_tokens={spec.num_tokens} but the encoder, selection and "
                                 f"pooling give {got} features per item; set num_tokens={got}")
    finally:
        model.train(was_training)


def assemble_model(
    language_model_dir: str | Path,
    encoders: dict[str, str | Path],
    modalities: dict[str, ModalitySpec],
    tokenizer_dir: str | Path | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Compose an MLLM from separately saved Hugging Face parts: a causal LM, encoder towers by name (e.g.
    {"image": clip_dir, "audio": whisper_dir}) and the modality specs (video can read the image tower with
    `encoder="image"`). The projectors are new (seeded by `seed`); the placeholders are added to the tokenizer
    (from `tokenizer_dir`, default the LM's directory) and the LM's embeddings grow to fit. Each spec's
    `num_tokens` is checked against its encoder. Save the result with `save_model` to get an mmcl model directory.
    """
    unknown = sorted(set(modalities) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; mmcl reads {sorted(PLACEHOLDERS)}")
    for m, spec in modalities.items():
        if spec.placeholder != PLACEHOLDERS[m]:
            raise ValueError(
                f"{m}: placeholder must be {PLACEHOLDERS[m]!r} (the records write it), got {spec.placeholder!r}"
            )
    opts = dict(dtype=dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code)
    lm_dir = Path(language_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_dir) if tokenizer_dir else lm_dir)
    token_ids = ensure_placeholders(tokenizer)
    _refuse_pickles(lm_dir, opts)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, **opts)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    towers = {
        name: load_encoder(d, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        for name, d in encoders.items()
    }
    torch.manual_seed(seed)
    model = MultimodalLM(lm, towers, dict(modalities), {m: token_ids[m] for m in modalities})
    model.to(dtype)
    check_num_tokens(model)
    return model, tokenizer


def _load_llava(path: Path, opts: dict) -> tuple[MultimodalLM, PreTrainedTokenizerFast]:
    """Map a `LlavaForConditionalGeneration` checkpoint onto the composition (vision tower, projector, LM)."""
    from transformers import LlavaForConditionalGeneration

    _refuse_pickles(path, opts)
    llava = LlavaForConditionalGeneration.from_pretrained(path, **opts)
    cfg = llava.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_config(cfg.text_config, dtype=opts["dtype"])
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    vision = llava.model.vision_tower
    vcfg = cfg.vision_config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    select = "patch" if cfg.vision_feature_select_strategy == "default" else "full"
    layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer[-1]
    spec = ModalitySpec("<image>", n_patches + (select == "full"), "mlp2x_gelu", layer, select, 1, vcfg.image_size)
    token_ids = ensure_placeholders(tokenizer)
    if cfg.image_token_index is not None and cfg.image_token_index < len(tokenizer):
        token_ids["image"] = cfg.image_token_index
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    model = MultimodalLM(lm, {"image": vision}, {"image": spec}, {"image": token_ids["image"]})
    src = llava.model.multi_modal_projector
    proj = model.projectors["image"]
    proj[0].load_state_dict(src.linear_1.state_dict())
    proj[2].load_state_dict(src.linear_2.state_dict())
    return model.to(opts["dtype"]), tokenizer


# -- inputs -----------------------------------------------------------------------------------------------------------


def _normalise(im: Image.Image, spec: ModalitySpec) -> torch.Tensor:
    im = im.convert("RGB").resize((spec.image_size, spec.image_size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_image(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode an image file into a normalised (3, S, S) tensor (squashed to the tower's resolution)."""
    with Image.open(path) as im:
        return _normalise(im, spec)


HOP_LENGTH = 160  # Whisper's log-mel hop: 100 frames per second at 16 kHz


@lru_cache(maxsize=8)
def _feature_extractor(n_mels: int, sampling_rate: int, seconds: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sampling_rate, chunk_length=seconds,
                                   hop_length=HOP_LENGTH)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a mono waveform: `scipy.signal.resample_poly` when scipy is installed, else band-limited resampling
    in the Fourier domain (numpy only; exact for periodic signals, slight edge effects otherwise)."""
    if rate_in == rate_out:
        return wave.astype(np.float32, copy=False)
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n_out = max(1, round(len(wave) * rate_out / rate_in))
        spectrum = np.fft.rfft(wave.astype(np.float64))
        keep = np.zeros(n_out // 2 + 1, dtype=complex)
        k = min(len(spectrum), len(keep))
        keep[:k] = spectrum[:k]
        return (np.fft.irfft(keep, n_out) * (n_out / len(wave))).astype(np.float32)
    g = math.gcd(rate_in, rate_out)
    return resample_poly(wave, rate_out // g, rate_in // g).astype(np.float32)


def audio_features(wave: np.ndarray, rate: int, spec: ModalitySpec) -> torch.Tensor:
    """Whisper log-mel features (n_mels, seconds * 100) of a mono waveform, padded or cut to `spec.seconds`."""
    wave = resample(np.asarray(wave, dtype=np.float32), rate, spec.sampling_rate)
    fe = _feature_extractor(spec.n_mels, spec.sampling_rate, spec.seconds)
    feats = fe(wave, sampling_rate=spec.sampling_rate, return_tensors="np").input_features[0]
    return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))


def load_audio(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode an audio file (anything libsndfile reads: WAV, FLAC, OGG, ...) into Whisper log-mel features
    (n_mels, seconds * 100): channels averaged to mono, resampled to `spec.sampling_rate`."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"audio file has no samples: {path}")
    return audio_features(data.mean(axis=1), rate, spec)


VIDEO_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def frame_indices(n: int, k: int) -> list[int]:
    """`k` frame indices spread uniformly over `n` frames, first and last included (repeats when n < k)."""
    if n <= 0:
        raise ValueError("the video has no frames")
    if k == 1:
        return [(n - 1) // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def load_video(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode a video into `spec.frames` normalised frames (T, 3, S, S), sampled uniformly over the clip.

    `path` is a video file PyAV reads (mp4, webm, mkv, ...) or a directory of frame images taken in name order.
    """
    k = spec.frames or 1
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video frame directory {path} holds no frame images ({', '.join(VIDEO_FRAME_SUFFIXES)})")
        chosen = []
        for i in frame_indices(len(files), k):
            with Image.open(files[i]) as im:
                chosen.append(_normalise(im, spec))
        return torch.stack(chosen)
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video file has no video stream: {path}")
        stream = container.streams.video[0]
        n = stream.frames
        if n > 0:  # the container knows its frame count: convert only the chosen frames
            want = frame_indices(n, k)
            picked: dict[int, torch.Tensor] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    picked[i] = _normalise(frame.to_image(), spec)
                if i >= want[-1]:
                    break
            if len(picked) == len(set(want)):
                return torch.stack([picked[i] for i in want])
            container.seek(0)  # fewer frames than announced: fall back to decoding them all
        frames = [_normalise(f.to_image(), spec) for f in container.decode(stream)]
    return torch.stack([frames[i] for i in frame_indices(len(frames), k)])


DECODERS = {"image": load_image, "audio": load_audio, "video": load_video}


def media_loader(model: MultimodalLM, capacity: int = 20000):
    """A media loader with a decoder for each modality the model reads: image files -> (3, S, S) pixels, audio
    files -> (n_mels, frames) log-mels, video files or frame folders -> (T, 3, S, S) frames."""
    from mmcl.data.batching import MediaLoader

    media = MediaLoader(model.modalities, capacity)
    for modality in model.modalities:
        if modality in DECODERS:
            media.register(modality, DECODERS[modality])
    return media


def conversation_format(model: MultimodalLM, tokenizer: PreTrainedTokenizerFast) -> ConversationFormat:
    return ConversationFormat(
        tokenizer,
        {m: s.num_tokens for m, s in model.modalities.items()},
        {m: s.cue for m, s in model.modalities.items()},
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


__all__ = [
    "TinySizes",
    "build_tiny",
    "save_model",
    "load_model",
    "load_encoder",
    "assemble_model",
    "check_num_tokens",
    "load_image",
    "load_audio",
    "load_video",
    "audio_features",
    "media_loader",
    "conversation_format",
    "count_parameters",
]
