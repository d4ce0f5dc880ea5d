"""Audio tasks in the spirit of P4's AudioCaps and Clotho-AQA: beeps of a pitch, a count and a timbre.

Numpy only by default, so every clip is byte-identical across machines for a seed. `with_speech` gives the same
tasks with spoken words (espeak-ng waveforms, see speech.py) mixed in: a clip is beeps, a word, or a word before or
after the beeps, captioned "a voice says red" and asked about with "Which word is spoken?".
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import replace
from functools import partial

import numpy as np

from .image_tasks import COLOUR_NAMES, NUMBER_WORDS
from .sounds import CLIP_SECONDS, COUNT_WORDS, PITCHES, SAMPLE_RATE, TIMBRES, TIMES_WORDS, beeps
from .spec import SHORT_ANSWER, Sample, TaskSpec, balanced

PITCH_NAMES: tuple[str, ...] = tuple(PITCHES)
COMBOS: tuple[tuple[str, int, str], ...] = tuple((p, c, t) for p in PITCH_NAMES for c in (1, 2, 3) for t in TIMBRES)
AUDIO_QUESTIONS: dict[str, str] = {
    "count": "How many beeps are there?",
    "pitch": "Is the pitch low, medium or high?",
    "timbre": "Which waveform makes the sound: sine, square or sawtooth?",
}
SPOKEN_WORDS: tuple[str, ...] = (*COLOUR_NAMES, *NUMBER_WORDS)  # words the world already uses
WORD_QUESTION = "Which word is spoken?"
# What a clip holds, in time order; without speech every clip is "beeps".
LAYOUTS: tuple[str, ...] = ("beeps", "word", "word+beeps", "beeps+word")
WORD_GAP = 0.05  # seconds of slack around a spoken word beside beeps
SPEECH_NOTE = " Some clips carry a spoken word (espeak-ng)."

Words = Mapping[str, np.ndarray]  # word -> its spoken waveform at SAMPLE_RATE, peak 1 (speech.word_bank)


def _beep_words(count: int) -> str:
    return "beep" if count == 1 else "beeps"


def _noise(rng: random.Random, n: int) -> np.ndarray:
    """The faint noise floor every clip has (as under the beeps)."""
    return np.random.default_rng(rng.getrandbits(64)).normal(0.0, 0.002, n)


def _spoken(rng: random.Random, voice: np.ndarray, n: int) -> np.ndarray:
    """`n` samples holding the spoken word at a random gain and start, over the noise floor."""
    wave = _noise(rng, n)
    at = rng.randint(0, n - len(voice))
    wave[at : at + len(voice)] += voice * rng.uniform(0.4, 0.7)
    return wave


def _clip(rng: random.Random, layout: str, pitch: str, count: int, timbre: str,
          voice: np.ndarray | None = None) -> np.ndarray:
    """A one-second clip in `layout`: the beeps alone (exactly as without speech), the word alone, or the word and
    the beeps side by side (the beeps get what time the word leaves, shrinking if they must)."""
    if layout == "beeps":
        return beeps(rng, pitch, count, timbre)
    n = round(CLIP_SECONDS * SAMPLE_RATE)
    if layout == "word":
        return np.clip(_spoken(rng, voice, n), -1.0, 1.0).astype(np.float32)
    word_n = len(voice) + round(WORD_GAP * SAMPLE_RATE)
    parts = [_spoken(rng, voice, word_n), beeps(rng, pitch, count, timbre, seconds=(n - word_n) / SAMPLE_RATE)]
    wave = np.concatenate(parts if layout == "word+beeps" else parts[::-1])
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _join(layout: str, beep_refs: list[str], word_refs: list[str]) -> list[str]:
    """Caption references for a layout: the beep or word captions, or both in the clip's order ("..., then ...")."""
    if layout == "beeps":
        return beep_refs
    if layout == "word":
        return word_refs
    first, second = (word_refs, beep_refs) if layout == "word+beeps" else (beep_refs, word_refs)
    return [f"{a}, then {b}" for a, b in zip(first, second)]


def _layouts(rng: random.Random, n: int, words: Words | None) -> list[str]:
    """The layout of each of `n` clips: balanced over LAYOUTS with speech, all beeps (no draws) without."""
    return balanced(rng, LAYOUTS, n) if words else ["beeps"] * n


def _qa_layout(rng: random.Random, kind: str, words: Words | None) -> str:
    """A QA clip's layout: a word question's clip has a word (maybe beside beeps), a beep question's clip has beeps
    (maybe beside a word); all beeps (no draw) without speech."""
    if not words:
        return "beeps"
    return rng.choice(("word" if kind == "word" else "beeps", "word+beeps", "beeps+word"))


def _word(rng: random.Random, layout: str) -> str:
    """The spoken word of a clip with one (no draw for beeps alone, so the default world is unchanged)."""
    return "" if layout == "beeps" else rng.choice(SPOKEN_WORDS)


def audio_cap(rng: random.Random, n: int, size: int, words: Words | None = None) -> Iterator[Sample]:
    """Caption a clip by count, pitch and timbre ("two high square beeps"), three paraphrase references; the 27
    combinations are balanced. With `words`, clips are balanced over LAYOUTS and a word adds "a voice says red"."""
    for (pitch, count, timbre), layout in zip(balanced(rng, COMBOS, n), _layouts(rng, n, words)):
        word = _word(rng, layout)
        wave = _clip(rng, layout, pitch, count, timbre, words[word] if word else None)
        noun = _beep_words(count)
        refs = [
            f"{COUNT_WORDS[count]} {pitch} {timbre} {noun}",
            f"{COUNT_WORDS[count]} {pitch}-pitched {timbre} {noun}",
            f"a {timbre} wave beeping {TIMES_WORDS[count]} at a {pitch} pitch",
        ]
        refs = _join(layout, refs, [f"a voice says {word}", f"someone says {word}", f"the word {word} is spoken"])
        yield Sample("Describe the audio briefly.", refs[0], refs, audio=wave)


def audio_qa(rng: random.Random, n: int, size: int, words: Words | None = None) -> Iterator[Sample]:
    """One question per clip, balanced over count (a digit), pitch (low/medium/high) and timbre. With `words`, also
    "Which word is spoken?" (the word alone or beside beeps), and beep questions may have a word beside the beeps."""
    kinds = (*AUDIO_QUESTIONS, "word") if words else tuple(AUDIO_QUESTIONS)
    for kind in balanced(rng, kinds, n):
        pitch, count, timbre = rng.choice(PITCH_NAMES), rng.randint(1, 3), rng.choice(TIMBRES)
        layout = _qa_layout(rng, kind, words)
        word = _word(rng, layout)
        wave = _clip(rng, layout, pitch, count, timbre, words[word] if word else None)
        answer = {"count": str(count), "pitch": pitch, "timbre": timbre, "word": word}[kind]
        answers = [answer, COUNT_WORDS[count]] if kind == "count" else [answer]
        question = WORD_QUESTION if kind == "word" else AUDIO_QUESTIONS[kind]
        yield Sample(f"{question}\n{SHORT_ANSWER}", answer, answers, audio=wave)


def align_audio(rng: random.Random, n: int, size: int, words: Words | None = None) -> Iterator[Sample]:
    """Alignment pairs for the audio tower (LLaVA stage 1): a clip of beeps and a short pitch-and-timbre caption;
    with `words`, clips are balanced over LAYOUTS and a word adds "a voice saying red"."""
    pairs = balanced(rng, [(p, t) for p in PITCH_NAMES for t in TIMBRES], n)
    for (pitch, timbre), layout in zip(pairs, _layouts(rng, n, words)):
        word = _word(rng, layout)
        wave = _clip(rng, layout, pitch, rng.randint(1, 3), timbre, words[word] if word else None)
        refs = [f"a {pitch} {timbre} sound", f"a {timbre} tone with a {pitch} pitch", f"{pitch} {timbre} beeping"]
        refs = _join(layout, refs, [f"a voice saying {word}", f"someone saying {word}", f"the spoken word {word}"])
        yield Sample("Describe the audio.", refs[0], refs, audio=wave)


def with_speech(spec: TaskSpec, words: Words) -> TaskSpec:
    """The same audio task with `words` (word -> spoken waveform) mixed into its clips."""
    return replace(spec, generate=partial(spec.generate, words=words), description=spec.description + SPEECH_NOTE)


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
