"""Spoken words for the offline world, synthesised with espeak-ng (opt-in: `mmcl data synth --speech`).

espeak-ng is a system program, not a Python dependency, so speech is optional: without `--speech` the world is numpy
only. With it, each word is spoken once by a fixed voice, speed and pitch, read with soundfile, resampled to the
world's rate with numpy and trimmed; the bytes are reproducible for one espeak-ng version (world.json records it).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterable

import numpy as np

from .sounds import SAMPLE_RATE

ESPEAK = "espeak-ng"
# English voice at 220 words per minute (default 175): fast enough that a word leaves room for beeps in a 1 s clip.
VOICE_ARGS: tuple[str, ...] = ("-v", "en", "-s", "220", "-p", "50", "-a", "100")
MAX_WORD_SECONDS = 0.45  # longest spoken word accepted, so a word and three beeps share a one-second clip
SILENCE = 0.02  # samples below this fraction of the peak count as silence when trimming


class SpeechUnavailable(RuntimeError):
    """Speech was asked for but cannot be made: espeak-ng is missing, or its words do not fit the clips."""


def espeak_path() -> str:
    """The espeak-ng executable on PATH, or SpeechUnavailable naming the fix."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise SpeechUnavailable("spoken words need espeak-ng, which is not on PATH: install espeak-ng, e.g. "
                                "apt-get install espeak-ng, or drop --speech (speech=False)")
    return path


def espeak_version() -> str:
    """espeak-ng's version ("1.51"), recorded in world.json because the synthesised bytes depend on it."""
    out = subprocess.run([espeak_path(), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip().splitlines()[0]


def resample(wave: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Resample by zero-padding or truncating the spectrum (an ideal low-pass, so no aliasing); numpy only."""
    if src == dst:
        return wave.astype(np.float64)
    n_out = round(len(wave) * dst / src)
    spectrum = np.fft.rfft(wave.astype(np.float64))
    keep = np.zeros(n_out // 2 + 1, dtype=complex)
    m = min(len(keep), len(spectrum))
    keep[:m] = spectrum[:m]
    return np.fft.irfft(keep, n_out) * (n_out / len(wave))


def trim(wave: np.ndarray, rate: int = SAMPLE_RATE, margin: float = 0.005) -> np.ndarray:
    """Cut the leading and trailing silence (keeping `margin` seconds) and normalise the peak to 1."""
    loud = np.flatnonzero(np.abs(wave) > SILENCE * np.abs(wave).max())
    pad = round(margin * rate)
    wave = wave[max(0, loud[0] - pad) : loud[-1] + pad + 1]
    return wave / np.abs(wave).max()


def speak(word: str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """One word spoken by espeak-ng: mono float64 at `rate`, silence trimmed, peak 1."""
    import soundfile

    wav = subprocess.run([espeak_path(), *VOICE_ARGS, "--stdout", word], capture_output=True, check=True).stdout
    wave, src = soundfile.read(io.BytesIO(wav), dtype="float64")
    wave = trim(resample(wave, src, rate), rate)
    if len(wave) > MAX_WORD_SECONDS * rate:
        raise SpeechUnavailable(f"espeak-ng spoke {word!r} in {len(wave) / rate:.2f} s, longer than the "
                                f"{MAX_WORD_SECONDS} s a clip has room for (espeak-ng {espeak_version()})")
    return wave


def word_bank(words: Iterable[str]) -> dict[str, np.ndarray]:
    """Every word spoken once (the clips reuse these waveforms at random gains and positions)."""
    return {w: speak(w) for w in words}
