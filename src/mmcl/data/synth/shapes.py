"""Pillow drawing primitives for the offline world: bold shapes, rendered words, deterministic PNG output."""

from __future__ import annotations

import importlib.util
import io
import math
import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Saturated, well-separated hues so a tiny model sees them apart even after 32x32 downsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (230, 190, 0),
    "purple": (140, 40, 185),
    "orange": (250, 125, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (238, 238, 238))

Box = tuple[int, int, int, int]  # half-open pixel box: x0, y0, x1, y1


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    verts = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        verts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [v[0] for v in verts], [v[1] for v in verts]
    # Normalise to the unit square so the star touches every side of its box (its box is then its true extent).
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in verts]


_T = 1 / 3
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [(_T, 0), (2 * _T, 0), (2 * _T, _T), (1, _T), (1, 2 * _T), (2 * _T, 2 * _T), (2 * _T, 1), (_T, 1),
              (_T, 2 * _T), (0, 2 * _T), (0, _T), (_T, _T)],
    "star": _star(),
}


def canvas(size: int, rng: random.Random) -> Image.Image:
    """Return a blank square RGB image on a white or light-grey background (varied so background is not a cue)."""
    return Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))


def draw_shape(img: Image.Image, kind: str, colour: str, box: Box) -> None:
    """Draw a filled `kind` shape in `colour` filling the half-open pixel `box` (the box is its true extent)."""
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        w, h = x1 - 1 - x0, y1 - 1 - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _POLYGONS[kind]], fill=fill)


@lru_cache(maxsize=64)
def bold_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Return a bold TrueType font at `size` px: matplotlib's bundled DejaVuSans-Bold, else Pillow's built-in font."""
    # Located without importing matplotlib (slow import); never rely on system fonts, which differ per machine.
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=1024)
def _fitted_font(word: str, size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, Box]:
    """The largest bold font at which `word` fits about 90 % of the width and 80 % of the height, and its text box."""
    draw = ImageDraw.Draw(Image.new("RGB", (size, size)))
    font_px = size
    while font_px > 6:
        font = bold_font(font_px)
        l, t, r, b = draw.textbbox((0, 0), word, font=font)
        if r - l <= 0.9 * size and b - t <= 0.8 * size:
            break
        font_px -= 1
    return font, (l, t, r, b)


def draw_word(img: Image.Image, word: str, rng: random.Random) -> None:
    """Render `word` in black bold letters as large as fits (about 90% of the width), jittered slightly."""
    size = img.width
    font, (l, t, r, b) = _fitted_font(word, size)
    slack_x, slack_y = size - (r - l), size - (b - t)
    x = rng.randint(slack_x // 4, max(slack_x // 4, slack_x - slack_x // 4)) - l
    y = rng.randint(slack_y // 4, max(slack_y // 4, slack_y - slack_y // 4)) - t
    ImageDraw.Draw(img).text((x, y), word, font=font, fill=(0, 0, 0))


def png_bytes(img: Image.Image) -> bytes:
    """Encode `img` as PNG without metadata, so equal pixels always give equal bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
