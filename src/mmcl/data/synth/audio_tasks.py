"""Audio tasks in the spirit of P4's AudioCaps and Clotho-AQA: beeps of a pitch, a count and a timbre.

Numpy only (no speech), so every clip is byte-identical across machines for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .sounds import COUNT_WORDS, PITCHES, TIMBRES, TIMES_WORDS, beeps
from .spec import SHORT_ANSWER, Sample, TaskSpec, balanced

PITCH_NAMES: tuple[str, ...] = tuple(PITCHES)
COMBOS: tuple[tuple[str, int, str], ...] = tuple((p, c, t) for p in PITCH_NAMES for c in (1, 2, 3) for t in TIMBRES)
AUDIO_QUESTIONS: dict[str, str] = {
    "count": "How many beeps are there?",
    "pitch": "Is the pitch low, medium or high?",
    "timbre": "Which waveform makes the sound: sine, square or sawtooth?",
}


def _beep_words(count: int) -> str:
    return "beep" if count == 1 else "beeps"


def audio_cap(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Caption a clip by count, pitch and timbre ("two high square beeps"), three paraphrase references; the 27
    combinations are balanced."""
    for pitch, count, timbre in balanced(rng, COMBOS, n):
        wave = beeps(rng, pitch, count, timbre)
        words = _beep_words(count)
        refs = [
            f"{COUNT_WORDS[count]} {pitch} {timbre} {words}",
            f"{COUNT_WORDS[count]} {pitch}-pitched {timbre} {words}",
            f"a {timbre} wave beeping {TIMES_WORDS[count]} at a {pitch} pitch",
        ]
        yield Sample("Describe the audio briefly.", refs[0], refs, audio=wave)


def audio_qa(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One question per clip, balanced over count (a digit), pitch (low/medium/high) and timbre."""
    for kind in balanced(rng, tuple(AUDIO_QUESTIONS), n):
        pitch, count, timbre = rng.choice(PITCH_NAMES), rng.randint(1, 3), rng.choice(TIMBRES)
        wave = beeps(rng, pitch, count, timbre)
        answer = {"count": str(count), "pitch": pitch, "timbre": timbre}[kind]
        answers = [answer, COUNT_WORDS[count]] if kind == "count" else [answer]
        yield Sample(f"{AUDIO_QUESTIONS[kind]}\n{SHORT_ANSWER}", answer, answers, audio=wave)


def align_audio(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Alignment pairs for the audio tower (LLaVA stage 1): a clip of beeps and a short pitch-and-timbre caption."""
    for pitch, timbre in balanced(rng, [(p, t) for p in PITCH_NAMES for t in TIMBRES], n):
        wave = beeps(rng, pitch, rng.randint(1, 3), timbre)
        refs = [f"a {pitch} {timbre} sound", f"a {timbre} tone with a {pitch} pitch", f"{pitch} {timbre} beeping"]
        yield Sample("Describe the audio.", refs[0], refs, audio=wave)


AUDIO_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("audio_cap", "audio", "caption", "cider",
             "Describe the audio briefly: how many beeps, their pitch and their waveform (AudioCaps-like).",
             audio_cap),
    TaskSpec("audio_qa", "audio", "qa", "exact_match",
             "How many beeps (a digit), which pitch or which waveform (Clotho-AQA-like)?", audio_qa),
)
AUDIO_ALIGN_TASK = TaskSpec("align_audio", "audio", "caption", "cider",
                            "Audio alignment pairs: a clip of beeps and its short pitch-and-timbre caption.",
                            align_audio)
