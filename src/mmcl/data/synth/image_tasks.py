"""Image instruction tasks in the spirit of CoIN: colour QA, counting, classes, OCR, grounding, MCQ, captions."""

from __future__ import annotations

import random
from collections.abc import Iterator

from PIL import Image

from .shapes import COLOURS, SHAPES, Box, canvas, draw_shape, draw_word
from .spec import SHORT_ANSWER, Sample, TaskSpec, balanced

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
OCR_WORDS: tuple[str, ...] = ("sun", "cat", "map", "box", "red", "dog", "cup", "hat", "pen", "fish", "tree", "moon")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
LETTERS = "ABCD"
# Caption regions: (phrase, alternative phrase, centre as fractions of the image).
REGIONS: tuple[tuple[str, str, tuple[float, float]], ...] = (
    ("at the top left", "in the top left corner", (0.27, 0.27)),
    ("at the top right", "in the top right corner", (0.73, 0.27)),
    ("at the bottom left", "in the bottom left corner", (0.27, 0.73)),
    ("at the bottom right", "in the bottom right corner", (0.73, 0.73)),
    ("in the center", "in the middle", (0.5, 0.5)),
)


def _box_around(cx: float, cy: float, side: int, size: int) -> Box:
    x0 = min(max(round(cx - side / 2), 0), size - side)
    y0 = min(max(round(cy - side / 2), 0), size - side)
    return (x0, y0, x0 + side, y0 + side)


def _random_box(rng: random.Random, size: int, lo: float, hi: float) -> Box:
    side = rng.randint(round(lo * size), round(hi * size))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    return (x0, y0, x0 + side, y0 + side)


def _single_shape(rng: random.Random, size: int, kind: str, colour: str, lo: float = 0.5,
                  hi: float = 0.8) -> Image.Image:
    img = canvas(size, rng)
    draw_shape(img, kind, colour, _random_box(rng, size, lo, hi))
    return img


def color_qa(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One large shape; answer its colour in one word."""
    for colour in balanced(rng, COLOUR_NAMES, n):
        img = _single_shape(rng, size, rng.choice(SHAPES), colour)
        yield Sample(f"What colour is the shape?\n{SHORT_ANSWER}", colour, [colour], img)


def count(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One to four identical shapes in distinct cells of a 3x3 grid (so they never overlap); answer how many."""
    cell = size // 3
    for k in balanced(rng, (1, 2, 3, 4), n):
        img = canvas(size, rng)
        kind, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
        side = rng.randint(round(0.65 * cell), round(0.9 * cell))
        for c in rng.sample(range(9), k):
            x0 = (c % 3) * cell + rng.randint(0, cell - side)
            y0 = (c // 3) * cell + rng.randint(0, cell - side)
            draw_shape(img, kind, colour, (x0, y0, x0 + side, y0 + side))
        # VQA-style: ten human answers, mostly the digit, sometimes the number word.
        words = rng.randint(0, 2)
        answers = [str(k)] * (10 - words) + [NUMBER_WORDS[k]] * words
        yield Sample(f"How many shapes are there?\n{SHORT_ANSWER}", str(k), answers, img)


def shape_cls(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One shape of any colour, 65-90 % of the image wide; name the object class. At 50-80 % (world data 4) the
    tiny tower's errors (square vs cross, circle vs diamond) fell on the smallest shapes: 12 % of those 32-35 px wide,
    2.5 % of those 48-51 px (docs/world.md)."""
    for kind in balanced(rng, SHAPES, n):
        img = _single_shape(rng, size, kind, rng.choice(COLOUR_NAMES), 0.65, 0.9)
        yield Sample("What object is shown?", kind, [kind], img)


def ocr(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """A short word in large bold letters filling the image; read it."""
    for word in balanced(rng, OCR_WORDS, n):
        img = canvas(size, rng)
        draw_word(img, word, rng)
        yield Sample(f"What word is written in the image?\n{SHORT_ANSWER}", word, [word], img)


def grounding(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One shape whose corners lie on a tenth-of-the-image grid (so the one-decimal answer fits it); give its box."""
    for kind in balanced(rng, SHAPES, n):
        colour = rng.choice(COLOUR_NAMES)
        side = rng.choice((3, 4, 5))  # tenths: 30-50% of the image
        gx, gy = rng.randint(0, 10 - side), rng.randint(0, 10 - side)
        x0, y0, x1, y1 = (round(g * size / 10) for g in (gx, gy, gx + side, gy + side))
        box = (x0, y0, x1, y1)
        img = canvas(size, rng)
        draw_shape(img, kind, colour, box)
        answer = "[" + ", ".join(f"{v / size:.1f}" for v in box) + "]"
        prompt = ("Please provide the bounding box coordinate of the region this sentence describes: "
                  f"the {colour} {kind}.")
        yield Sample(prompt, answer, [answer], img)


def mcq(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """ScienceQA-like: one shape and four lettered options (gold balanced over A-D); answer with the option's text,
    which `option_letter` scores like its letter. The 4-layer tiny LM does not learn to answer a seen shape by its
    letter at any budget tried (chance, docs/results/mcq_probe.py); by its text it does (docs/world.md)."""
    for gold_pos in balanced(rng, range(4), n):
        kind = rng.choice(SHAPES)
        options = rng.sample([s for s in SHAPES if s != kind], 3)
        options.insert(gold_pos, kind)
        img = _single_shape(rng, size, kind, rng.choice(COLOUR_NAMES))
        lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
        prompt = f"Which shape is shown?\n{lines}\nAnswer with the option's text from the given choices directly."
        yield Sample(prompt, kind, [LETTERS[gold_pos]], img)


def caption(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One shape (size and region named) or two shapes left and right; describe briefly, three paraphrase refs."""
    for n_shapes in balanced(rng, (1, 2), n):
        img = canvas(size, rng)
        if n_shapes == 1:
            kind, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
            phrase, alt, (fx, fy) = rng.choice(REGIONS)
            big = rng.random() < 0.5
            side = round(rng.uniform(0.44, 0.5) * size) if big else round(rng.uniform(0.22, 0.28) * size)
            jitter = 0.03 * size
            cx, cy = fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)
            draw_shape(img, kind, colour, _box_around(cx, cy, side, size))
            adj = "large" if big else "small"
            refs = [f"a {adj} {colour} {kind} {phrase}", f"there is a {adj} {colour} {kind} {phrase}",
                    f"a {colour} {kind} {alt}"]
        else:
            (k1, k2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(COLOUR_NAMES, 2)
            side = round(rng.uniform(0.3, 0.4) * size)
            cy = size / 2 + rng.uniform(-0.15, 0.15) * size
            draw_shape(img, k1, c1, _box_around(0.27 * size, cy, side, size))
            draw_shape(img, k2, c2, _box_around(0.73 * size, cy, side, size))
            refs = [f"a {c1} {k1} and a {c2} {k2}", f"a {c1} {k1} on the left and a {c2} {k2} on the right",
                    f"there is a {c1} {k1} and a {c2} {k2}"]
        yield Sample("Describe the image briefly.", refs[0], refs, img)


def _region_of(box: Box, size: int) -> str:
    """The caption region phrase nearest to the centre of `box`."""
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    return min(REGIONS, key=lambda r: (r[2][0] - cx) ** 2 + (r[2][1] - cy) ** 2)[0]


ALIGN_KINDS = ("shape", "count", "word", "box")


def align(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """LLaVA stage-1 analogue, with the kinds of caption a real pre-training mix holds (LAION-style captions, text
    in images, grounded captions as in Kosmos-2/Shikra): one shape named by colour, class and place; one to four
    identical shapes with their number; a written word; one shape with its box. The stream's tasks then ask for
    what the base model has seen described, in new formats (so a task is learnable in the stream's few steps)."""
    for what in balanced(rng, ALIGN_KINDS, n):
        img = canvas(size, rng)
        kind, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
        if what == "shape":
            box = _random_box(rng, size, 0.3, 0.8)
            draw_shape(img, kind, colour, box)
            where = _region_of(box, size)
            refs = [f"a {colour} {kind} {where}", f"there is a {colour} {kind} {where}", f"a {colour} {kind}"]
        elif what == "count":
            k = rng.randint(1, 4)
            cell = size // 3
            side = rng.randint(round(0.65 * cell), round(0.9 * cell))
            for c in rng.sample(range(9), k):
                x0 = (c % 3) * cell + rng.randint(0, cell - side)
                y0 = (c // 3) * cell + rng.randint(0, cell - side)
                draw_shape(img, kind, colour, (x0, y0, x0 + side, y0 + side))
            noun = kind if k == 1 else "crosses" if kind == "cross" else f"{kind}s"
            refs = [f"{NUMBER_WORDS[k]} {colour} {noun}", f"{k} {colour} {noun}", f"there are {k} {noun}"]
        elif what == "word":
            word = rng.choice(OCR_WORDS)
            draw_word(img, word, rng)
            refs = [f"the word {word}", f"the word {word} in black letters", f"{word} written in black"]
        else:
            side = rng.choice((3, 4, 5))
            gx, gy = rng.randint(0, 10 - side), rng.randint(0, 10 - side)
            box = tuple(round(g * size / 10) for g in (gx, gy, gx + side, gy + side))
            draw_shape(img, kind, colour, box)
            coords = "[" + ", ".join(f"{g / 10:.1f}" for g in (gx, gy, gx + side, gy + side)) + "]"
            refs = [f"a {colour} {kind} at {coords}", f"the {colour} {kind} {coords}", f"a {kind} at {coords}"]
        yield Sample("Describe the image.", refs[0], refs, img)


STREAM_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("color_qa", "image", "qa", "exact_match", "What colour is the shape? One word.", color_qa),
    TaskSpec("shape_cls", "image", "classification", "classification",
             "What object is shown? One of six shape classes.", shape_cls),
    TaskSpec("count", "image", "qa", "vqa_accuracy", "How many shapes (1-4)? Answer a digit.", count),
    TaskSpec("ocr", "image", "qa", "exact_match", "What word is written in the image? A three- or four-letter word.",
             ocr),
    TaskSpec("mcq", "image", "mcq", "option_letter",
             "Which shape is shown? Answer with the text of one of four lettered options.", mcq),
    TaskSpec("grounding", "image", "grounding", "box_iou",
             "Give the bounding box [x1, y1, x2, y2] (fractions, one decimal) of the described shape.", grounding),
    TaskSpec("caption", "image", "caption", "cider", "Describe the image briefly: shapes, colours, size, place.",
             caption),
)
ALIGN_TASK = TaskSpec("align", "image", "caption", "cider",
                      "Alignment pairs (LLaVA stage 1): shapes, counts, words and boxes, each with a short caption.",
                      align)


IMAGE_QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}


def image_qa(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """OK-VQA stand-in for the MICL streams: one shape, asked either its colour or its shape (balanced)."""
    for kind_of_question in balanced(rng, tuple(IMAGE_QUESTIONS), n):
        kind, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
        img = _single_shape(rng, size, kind, colour)
        answer = colour if kind_of_question == "colour" else kind
        yield Sample(f"{IMAGE_QUESTIONS[kind_of_question]}\n{SHORT_ANSWER}", answer, [answer], img)


# The image tasks of the MICL streams (P4: Flickr30k captions, OK-VQA).
MICL_IMAGE_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("image_cap", "image", "caption", "cider", "Describe the image briefly (Flickr30k-like).", caption),
    TaskSpec("image_qa", "image", "qa", "exact_match", "What colour is the shape, or what shape is it (OK-VQA-like)?",
             image_qa),
)
