"""Media decoding shared by every backend: image files -> PIL images, audio files -> mono waveforms, video files or
frame folders -> sampled frames, plus the two transforms more than one backend needs (pixel normalisation and
Whisper log-mel features). No torchvision, torchaudio or torchcodec: Pillow, soundfile and PyAV do the work."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HOP_LENGTH = 160  # Whisper's log-mel hop: 100 frames per second at 16 kHz
VIDEO_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_image(path: Path) -> Image.Image:
    """An image file as an RGB PIL image (decoded fully, the file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def normalise_image(im: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Squash to size x size (bicubic), scale to [0, 1], standardise per channel: a (3, S, S) float tensor."""
    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


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


def read_audio(path: Path, rate: int) -> np.ndarray:
    """An audio file (anything libsndfile reads: WAV, FLAC, OGG, ...) as a mono float32 waveform at `rate` Hz."""
    import soundfile

    data, rate_in = soundfile.read(str(path), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"audio file has no samples: {path}")
    return resample(data.mean(axis=1), rate_in, rate)


@lru_cache(maxsize=8)
def _feature_extractor(n_mels: int, sampling_rate: int, seconds: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sampling_rate, chunk_length=seconds,
                                   hop_length=HOP_LENGTH)


def log_mel(wave: np.ndarray, n_mels: int, sampling_rate: int, seconds: int) -> torch.Tensor:
    """Whisper log-mel features (n_mels, seconds * 100) of a mono waveform at `sampling_rate`, padded or cut."""
    fe = _feature_extractor(n_mels, sampling_rate, seconds)
    feats = fe(np.asarray(wave, dtype=np.float32), sampling_rate=sampling_rate, return_tensors="np").input_features[0]
    return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))


def frame_indices(n: int, k: int) -> list[int]:
    """`k` frame indices spread uniformly over `n` frames, first and last included (repeats when n < k)."""
    if n <= 0:
        raise ValueError("the video has no frames")
    if k == 1:
        return [(n - 1) // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def read_video_frames(path: Path, k: int) -> list[Image.Image]:
    """`k` RGB frames sampled uniformly over a clip: a video file PyAV reads (mp4, webm, mkv, ...) or a directory
    of frame images taken in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"video frame directory {path} holds no frame images ({', '.join(VIDEO_FRAME_SUFFIXES)})")
        return [read_image(files[i]) for i in frame_indices(len(files), k)]
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video file has no video stream: {path}")
        stream = container.streams.video[0]
        n = stream.frames
        if n > 0:  # the container knows its frame count: convert only the chosen frames
            want = frame_indices(n, k)
            picked: dict[int, Image.Image] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    picked[i] = frame.to_image().convert("RGB")
                if i >= want[-1]:
                    break
            if len(picked) == len(set(want)):
                return [picked[i] for i in want]
            container.seek(0)  # fewer frames than announced: fall back to decoding them all
        frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
    return [frames[i] for i in frame_indices(len(frames), k)]
