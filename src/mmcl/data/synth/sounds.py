"""Numpy waveforms for the offline world: beeps of a pitch, a count and a timbre, and deterministic WAV output."""

from __future__ import annotations

import io
import random

import numpy as np

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
# Well apart on the mel scale (Whisper's 80 bins up to 8 kHz), so a tiny encoder hears them apart.
PITCHES: dict[str, float] = {"low": 300.0, "medium": 800.0, "high": 2000.0}
TIMBRES: tuple[str, ...] = ("sine", "square", "sawtooth")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
TIMES_WORDS: tuple[str, ...] = ("never", "once", "twice", "three times")


def tone(timbre: str, freq: float, n: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """`n` samples of a band-limited periodic tone (additive synthesis up to the Nyquist frequency, so no aliasing):
    sine = the fundamental only; square = odd harmonics at 1/k; sawtooth = every harmonic at 1/k. Peak about 1."""
    t = np.arange(n, dtype=np.float64) / rate
    if timbre == "sine":
        ks = np.array([1.0])
    elif timbre == "square":
        ks = np.arange(1, int(rate / 2 / freq) + 1, 2, dtype=np.float64)
    elif timbre == "sawtooth":
        ks = np.arange(1, int(rate / 2 / freq) + 1, dtype=np.float64)
    else:
        raise ValueError(f"unknown timbre {timbre!r}; use one of {TIMBRES}")
    wave = (np.sin(2 * np.pi * freq * np.outer(t, ks)) / ks).sum(1)
    return wave / np.abs(wave).max()


def beeps(rng: random.Random, pitch: str, count: int, timbre: str, seconds: float = CLIP_SECONDS,
          rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono clip of `count` equal beeps (0.10-0.16 s each, 0.08-0.14 s apart, 5 ms fades, pitch jittered by up to
    4%) at a random start, over a faint noise floor; float32 in [-1, 1]. A clip too short for them shrinks them."""
    n = round(seconds * rate)
    freq = PITCHES[pitch] * rng.uniform(0.96, 1.04)
    length, gap = rng.uniform(0.10, 0.16), rng.uniform(0.08, 0.14)
    total = count * length + (count - 1) * gap
    if total > seconds - 0.06:  # a short clip (beside a spoken word): shrink beeps and gaps alike so all fit
        scale = (seconds - 0.06) / total
        length, gap, total = length * scale, gap * scale, seconds - 0.06
    start = rng.uniform(0.03, max(0.03, seconds - total - 0.03))
    beep_n = round(length * rate)
    fade = min(round(0.005 * rate), beep_n // 2)
    env = np.ones(beep_n)
    env[:fade] = np.linspace(0.0, 1.0, fade)
    env[-fade:] = np.linspace(1.0, 0.0, fade)
    beep = tone(timbre, freq, beep_n, rate) * env * rng.uniform(0.3, 0.6)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 0.002, n)
    wave = noise
    for k in range(count):
        at = round((start + k * (length + gap)) * rate)
        wave[at : at + beep_n] += beep[: n - at]
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def wav_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Encode a mono float waveform as 16-bit PCM WAV (no metadata chunks, so equal samples give equal bytes)."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()
