"""The composition's processor: mmcl's plain conversation format (`ConversationFormat`) and media decoded as each
modality's spec says (squashed and normalised pixels, Whisper log-mels, uniformly sampled frames)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmcl.data import media as io
from mmcl.models.base import MediaItem, Processor
from mmcl.models.mllm import ModalitySpec, MultimodalLM
from mmcl.models.tokenizer import ChatTurns, ConversationFormat


def load_image(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode an image file into a normalised (3, S, S) tensor (squashed to the tower's resolution)."""
    return io.normalise_image(io.read_image(path), spec.image_size, spec.mean, spec.std)


def audio_features(wave, rate: int, spec: ModalitySpec) -> torch.Tensor:
    """Whisper log-mel features (n_mels, seconds * 100) of a mono waveform, padded or cut to `spec.seconds`."""
    import numpy as np

    wave = io.resample(np.asarray(wave, dtype=np.float32), rate, spec.sampling_rate)
    return io.log_mel(wave, spec.n_mels, spec.sampling_rate, spec.seconds)


def load_audio(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode an audio file into Whisper log-mel features (n_mels, seconds * 100): channels averaged to mono,
    resampled to `spec.sampling_rate`."""
    return io.log_mel(io.read_audio(path, spec.sampling_rate), spec.n_mels, spec.sampling_rate, spec.seconds)


def load_video(path: Path, spec: ModalitySpec) -> torch.Tensor:
    """Decode a video (file or frame folder) into `spec.frames` normalised frames (T, 3, S, S), sampled uniformly."""
    frames = io.read_video_frames(path, spec.frames or 1)
    return torch.stack([io.normalise_image(f, spec.image_size, spec.mean, spec.std) for f in frames])


DECODERS = {"image": load_image, "audio": load_audio, "video": load_video}


class CompositionProcessor(Processor):
    """Records into the composition's inputs: `<s>USER: ...\\nASSISTANT: answer</s>\\n` turns, each media item one
    placeholder token in the text, expanded to the modality's cue and `num_tokens` placeholders at collation."""

    def __init__(self, tokenizer, specs: dict[str, ModalitySpec], token_ids: dict[str, int] | None = None,
                 chat_template: bool = False):
        self.tokenizer = tokenizer
        self.specs = dict(specs)
        self.modalities = tuple(specs)
        turns = ChatTurns.from_template(tokenizer) if chat_template else None
        self.fmt = ConversationFormat(tokenizer, {m: 1 for m in specs}, {}, turns)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = list(dict.fromkeys([self.fmt.eos, self.fmt.end[0]]))
        cues = ConversationFormat(tokenizer, {m: 1 for m in specs}, {m: s.cue for m, s in specs.items()}).cue_ids
        # the expansion uses the ids the model scatters features into (a mapped LLaVA keeps its image_token_index)
        feature_ids = {**self.fmt.ids, **(token_ids or {})}
        self._tokens = {m: cues.get(m, []) + [feature_ids[m]] * s.num_tokens for m, s in specs.items()}

    def placeholder_id(self, modality: str) -> int:
        return self.fmt.ids[modality]

    def encode(self, conversations: list[dict], for_generation: bool = False) -> tuple[list[int], list[int]]:
        return self.fmt.encode(conversations, for_generation=for_generation)

    def load_media(self, modality: str, path: Path) -> MediaItem:
        return MediaItem({"values": DECODERS[modality](path, self.specs[modality])}, list(self._tokens[modality]))

    def decode_answer(self, token_ids: list[int]) -> str:
        return self.fmt.decode_answer(token_ids)


def composition_processor(model: MultimodalLM, tokenizer) -> CompositionProcessor:
    return CompositionProcessor(tokenizer, model.modalities, model.token_ids, chat_template=model.chat_template)
