"""Language-only skills (arithmetic, invented facts, word order): LM pre-training data and retention tasks."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .image_tasks import COLOUR_NAMES
from .spec import Sample, TaskSpec, balanced

ORDER_WORDS: tuple[str, ...] = ("cat", "sun", "map", "box", "dog", "cup", "hat", "pen", "tree", "moon", "star", "fish",
                                "bird", "book", "door", "lamp")
HOMES: tuple[str, ...] = ("cave", "lake", "forest", "hill", "desert", "swamp", "river", "meadow")
FOODS: tuple[str, ...] = ("berries", "fish", "grass", "seeds", "honey", "leaves", "nuts", "worms")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "gr", "fl", "tr", "sn", "kr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("b", "g", "k", "m", "p", "t", "x", "lt", "nk", "rb", "mp", "sh")
N_CREATURES = 30

# Training asks every fact in both phrasings, the test in the second: a memorised skill, as arithmetic is. (World data
# 3 tested a phrasing never trained, which a tiny LM cannot map to the trained one: 0-16 by pre-training seed.)
FACT_TEMPLATES = {
    "food": ("What does a {name} eat?", "What is the food of a {name}?"),
    "colour": ("What colour is a {name}?", "Which colour does a {name} have?"),
    "home": ("Where does a {name} live?", "What is the home of a {name}?"),
}


def knowledge_base(seed: int) -> dict[str, dict[str, str]]:
    """Return the invented knowledge base of `seed`: creature name -> {food, colour, home}, 30 creatures."""
    rng = random.Random(f"mmcl-world/{seed}/knowledge-base")
    names: list[str] = []
    while len(names) < N_CREATURES:
        parts = (_ONSETS, _VOWELS, _ONSETS, _VOWELS, _CODAS)
        name = "".join(rng.choice(p) for p in parts)
        if name not in names:
            names.append(name)
    return {n: {"food": rng.choice(FOODS), "colour": rng.choice(COLOUR_NAMES), "home": rng.choice(HOMES)}
            for n in names}


def lang_arith(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Single-digit addition and subtraction with non-negative results."""
    for op in balanced(rng, ("plus", "minus"), n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "minus" and a < b:
            a, b = b, a
        result = a + b if op == "plus" else a - b
        yield Sample(f"What is {a} {op} {b}?", str(result), [str(result)])


def lang_order(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Reverse a list of two to four distinct words."""
    for k in balanced(rng, (2, 3, 4), n):
        words = rng.sample(ORDER_WORDS, k)
        answer = " ".join(reversed(words))
        yield Sample(f"Reverse the words: {' '.join(words)}", answer, [answer])


def facts_generator(seed: int) -> tuple[TaskSpec, TaskSpec]:
    """Return the train-template and test-template generators of the `seed` knowledge base as (train, test) specs."""
    kb = knowledge_base(seed)
    facts = [(name, attr) for name in kb for attr in FACT_TEMPLATES]

    def make(templates: tuple[int, ...]):
        def gen(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
            for (name, attr), k in balanced(rng, [(f, k) for f in facts for k in templates], n):
                answer = kb[name][attr]
                yield Sample(FACT_TEMPLATES[attr][k].format(name=name), answer, [answer])
        return gen

    desc = "Facts of an invented knowledge base (food, colour, home of 30 creatures), trained in two phrasings."
    return (TaskSpec("lang_facts", "text", "qa", "exact_match", desc, make((0, 1))),
            TaskSpec("lang_facts", "text", "qa", "exact_match", desc, make((1,))))


def text_tasks(seed: int) -> list[tuple[TaskSpec, TaskSpec]]:
    """Return the language skills as (train spec, test spec) pairs; only lang_facts differs between its splits."""
    arith = TaskSpec("lang_arith", "text", "qa", "exact_match", "Single-digit addition and subtraction.", lang_arith)
    order = TaskSpec("lang_order", "text", "qa", "exact_match", "Reverse the order of two to four words.", lang_order)
    return [(arith, arith), facts_generator(seed), (order, order)]
