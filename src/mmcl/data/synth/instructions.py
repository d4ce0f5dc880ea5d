"""Text-only instructions for MoInCL's instruction-based distillation (P4 samples Natural Instructions, which is not
available offline), disjoint from every evaluated record of the world by construction.

The retention tasks ask arithmetic ("What is 3 plus 4?"), invented facts ("What is the food of a blorax?") and
word reversal ("Reverse the words: ..."). These templates ask other small skills over the same vocabulary (repeat,
first/last word, count words, name another colour or food, describe a shape), and none starts with the opening
words of an evaluated template, so no instruction can equal an evaluated prompt and none asks a retention skill
itself: distilling on them cannot teach the retention answers (the leak P4's default pool had here, when it drew
the retention tasks' own training records). `mmcl.data.overlap` checks it again before every run.
"""

from __future__ import annotations

import random

from .image_tasks import COLOUR_NAMES
from .shapes import SHAPES
from .text_tasks import FOODS, HOMES, ORDER_WORDS

TEMPLATES: tuple[str, ...] = (
    "Repeat the words: {words}",
    "Say the first word of: {words}",
    "Say the last word of: {words}",
    "Count the words in: {words}",
    "Name a colour that is not {colour}.",
    "Name a food that is not {food}.",
    "Name a place that is not a {home}.",
    "Describe a {colour} {shape}.",
    "Write a short sentence about a {word} and a {other}.",
    "Which word is longer, {word} or {other}?",
)
DEFAULT_SIZE = 512
"""Instructions in the built-in pool (MoInCL samples `text_instruct_num` of them per micro-batch)."""


def _fill(template: str, rng: random.Random) -> str:
    words = rng.sample(ORDER_WORDS, rng.randint(2, 4))
    word, other = rng.sample(ORDER_WORDS, 2)
    return template.format(words=" ".join(words), word=word, other=other, colour=rng.choice(COLOUR_NAMES),
                           food=rng.choice(FOODS), home=rng.choice(HOMES), shape=rng.choice(SHAPES))


def instruction_pool(n: int = DEFAULT_SIZE, seed: int = 0) -> list[str]:
    """`n` distinct instructions, the templates taken in turn, filled from a generator seeded by `seed` (same
    arguments, same list). Fewer than `n` only if the templates cannot make that many distinct ones."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"mmcl-instructions/{seed}")
    out: list[str] = []
    seen: set[str] = set()
    misses, k = 0, 0
    while len(out) < n and misses < 50 * n:
        text = _fill(TEMPLATES[k % len(TEMPLATES)], rng)  # a template out of new fillings only repeats
        k += 1
        if text in seen:
            misses += 1
            continue
        seen.add(text)
        out.append(text)
    return out
