"""The shared shape of a generated task: one sample, one task definition, and balanced label sampling."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")

# LLaVA-1.5's short-answer suffix, so the world's prompts look like the real instruction mix.
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Sample:
    """One generated example: the human prompt (without a placeholder), the gold answer, and at most one medium:
    an image, an audio waveform (mono float32 at `sounds.SAMPLE_RATE`) or a video (a list of equal-sized frames)."""

    prompt: str
    answer: str
    answers: list[str] = field(default_factory=list)  # every acceptable reference; defaults to [answer]
    image: Image.Image | None = None
    audio: np.ndarray | None = None
    video: list[Image.Image] | None = None


Generator = Callable[[random.Random, int, int], Iterator[Sample]]  # (rng, n, image_size) -> n samples (frames too)


@dataclass(frozen=True)
class TaskSpec:
    """A task of the world: the manifest fields and the function that generates its samples."""

    name: str
    modality: str
    type: str
    scorer: str
    description: str
    generate: Generator


def balanced(rng: random.Random, values: Sequence[T], n: int) -> list[T]:
    """Return `n` values cycling through every value equally often, shuffled, so every label is seen (and scored)."""
    out: list[T] = []
    while len(out) < n:
        block = list(values)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]
