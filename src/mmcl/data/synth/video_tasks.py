"""Video tasks in the spirit of P4's MSR-VTT and MSVD-QA: a shape that moves, grows or shrinks, or changes colour,
over 4-8 frames. The first frame always shows the start state and the last frame the end state, so any uniform
sampling that keeps both ends (the model's `load_video`) sees the whole event."""

from __future__ import annotations

import random
from collections.abc import Iterator

from PIL import Image

from .image_tasks import COLOUR_NAMES, _box_around
from .shapes import SHAPES, canvas, draw_shape
from .spec import SHORT_ANSWER, Sample, TaskSpec, balanced

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
EVENTS: tuple[str, ...] = ("move", "size", "colour")
MIN_FRAMES, MAX_FRAMES = 4, 8


def _direction_phrase(d: str) -> str:
    return f"to the {d}" if d in ("left", "right") else d


def clip(rng: random.Random, size: int, event: str, kind: str, colour: str, *, direction: str = "right",
         grow: bool = True, new_colour: str = "blue") -> list[Image.Image]:
    """Draw one clip of 4-8 frames on a fixed background: `kind` in `colour` moving in `direction` from one side
    to the other ("move"), growing or shrinking about a fixed centre ("size"), or switching to `new_colour` at a
    frame strictly between the first and the last ("colour")."""
    frames = rng.randint(MIN_FRAMES, MAX_FRAMES)
    bg = canvas(size, rng)
    side = round(rng.uniform(0.3, 0.38) * size)
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
    lo, hi = 0.2 * size, 0.8 * size  # centres at the start and end of a move
    small, large = round(0.2 * size), round(0.6 * size)
    switch = rng.randint(1, frames - 1)
    out = []
    for f in range(frames):
        u = f / (frames - 1)
        img = bg.copy()
        x, y, s, c = cx, cy, side, colour
        if event == "move":
            pos = lo + (hi - lo) * (u if direction in ("right", "down") else 1 - u)
            if direction in ("left", "right"):
                x = pos
            else:
                y = pos
        elif event == "size":
            s = round(small + (large - small) * (u if grow else 1 - u))
        elif event == "colour":
            c = new_colour if f >= switch else colour
        draw_shape(img, kind, c, _box_around(x, y, s, size))
        out.append(img)
    return out


def _event(rng: random.Random, size: int, event: str) -> tuple[list[Image.Image], dict]:
    kind, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
    info = {"event": event, "kind": kind, "colour": colour, "direction": rng.choice(DIRECTIONS),
            "grow": rng.random() < 0.5, "new_colour": rng.choice([c for c in COLOUR_NAMES if c != colour])}
    frames = clip(rng, size, event, kind, colour, direction=info["direction"], grow=info["grow"],
                  new_colour=info["new_colour"])
    return frames, info


def _captions(i: dict) -> list[str]:
    kind, colour = i["kind"], i["colour"]
    if i["event"] == "move":
        d = _direction_phrase(i["direction"])
        return [f"a {colour} {kind} moving {d}", f"a {colour} {kind} that moves {d}",
                f"there is a {colour} {kind} moving {d}"]
    if i["event"] == "size":
        verb, alt = ("growing", "getting bigger") if i["grow"] else ("shrinking", "getting smaller")
        return [f"a {colour} {kind} {verb}", f"a {colour} {kind} {alt}", f"there is a {colour} {kind} {verb}"]
    new = i["new_colour"]
    return [f"a {colour} {kind} turning {new}", f"a {kind} changing from {colour} to {new}",
            f"a {colour} {kind} that becomes {new}"]


def video_cap(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Caption the event ("a red circle moving to the right"), three paraphrase references; events balanced."""
    for event in balanced(rng, EVENTS, n):
        frames, info = _event(rng, size, event)
        refs = _captions(info)
        yield Sample("Describe the video briefly.", refs[0], refs, video=frames)


VIDEO_QUESTIONS = {
    "move": "Which way does the shape move?",
    "size": "Does the shape grow or shrink?",
    "colour": "What colour does the shape become?",
}


def video_qa(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """One question per clip on its event: the direction of a move, grow or shrink, or the colour it becomes."""
    for event in balanced(rng, EVENTS, n):
        frames, info = _event(rng, size, event)
        if event == "move":
            answer = info["direction"]
        elif event == "size":
            answer = "grow" if info["grow"] else "shrink"
        else:
            answer = info["new_colour"]
        yield Sample(f"{VIDEO_QUESTIONS[event]}\n{SHORT_ANSWER}", answer, [answer], video=frames)


def align_video(rng: random.Random, n: int, size: int) -> Iterator[Sample]:
    """Alignment pairs for the video path: a clip and a short caption naming the shape and the kind of event."""
    verbs = {"move": "moving", "size": "changing size", "colour": "changing colour"}
    for event in balanced(rng, EVENTS, n):
        frames, info = _event(rng, size, event)
        kind, colour, verb = info["kind"], info["colour"], verbs[event]
        refs = [f"a {colour} {kind} {verb}", f"a video of a {colour} {kind} {verb}", f"a {kind} that is {colour}"]
        yield Sample("Describe the video.", refs[0], refs, video=frames)


VIDEO_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("video_qa", "video", "qa", "exact_match",
             "Which way does the shape move, does it grow or shrink, what colour does it become (MSVD-QA-like)?",
             video_qa),
    TaskSpec("video_cap", "video", "caption", "cider",
             "Describe the video briefly: the shape, its colour and what happens to it (MSR-VTT-like).", video_cap),
)
VIDEO_ALIGN_TASK = TaskSpec("align_video", "video", "caption", "cider",
                            "Video alignment pairs: a clip of one shape and a short caption of the kind of event.",
                            align_video)
