"""Synthetic visual QA data: one filled shape on a light background.

Used to train the demo model (``scripts/train_demo.py``), to test that it answers
(``blip2.demo_eval``) and by the benchmarks. Pure Pillow and ``random``: no torch,
no numpy, so it imports anywhere.

An image holds exactly one shape (circle, square or triangle pointing up, axis-aligned)
of one of six colours, filled, anywhere in the frame; its bounding box is a square
whose side is a third to a half of the image's shorter side. The background is a light
gradient (every channel 200..255) with a little noise; the shape's colour is jittered
by at most ``JITTER`` per channel, which keeps every colour far from the others and
from the background (min channel of a shape pixel is at most 60, of a background
pixel at least ``BACKGROUND_MIN - 8``).
"""

from __future__ import annotations

import math
import random
from typing import Optional

from PIL import Image, ImageChops, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 210, 25),
    "purple": (135, 45, 175),
    "orange": (245, 130, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

QUESTIONS: dict[str, str] = {
    "color": "Question: what color is the shape? Answer:",
    "shape": "Question: what shape is this? Answer:",
    "caption": "",
}

JITTER = 15  # max per-channel change of the shape colour
BACKGROUND_MIN = 200  # gradient channels lie in [BACKGROUND_MIN, 255], grain adds at most +-8
_GRAIN = 8  # max per-pixel grain on half of the backgrounds


def expected(kind: str, color: str, shape: str) -> str:
    """The answer the demo model should give (no leading space, no "\\n"): "red", "circle", "a red circle"."""
    if kind == "color":
        return color
    if kind == "shape":
        return shape
    if kind == "caption":
        article = "an" if color[0] in "aeiou" else "a"
        return f"{article} {color} {shape}"
    raise ValueError(f"kind is {kind!r}; use one of {', '.join(QUESTIONS)}")


def shape_bounds(size: tuple[int, int]) -> tuple[int, int]:
    """(smallest, largest) side in pixels of a shape's bounding box in an image of ``size``."""
    short = min(size)
    return max(1, -(-short // 3)), max(1, short // 2)


def _background(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A light 2x2 colour grid blown up into a smooth gradient, sometimes with mild grain."""
    corners = Image.new("RGB", (2, 2))
    base = [rng.randint(BACKGROUND_MIN + 12, 243) for _ in range(3)]
    corners.putdata([tuple(c + rng.randint(-12, 12) for c in base) for _ in range(4)])
    background = corners.resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        # grain in [-_GRAIN, +_GRAIN], drawn from ``rng`` (Pillow's effect_noise is unseeded)
        step = max(2, -(-max(size) // 512))  # grain cells of step x step pixels, at most 512 across
        small = (max(1, size[0] // step), max(1, size[1] // step))
        raw = Image.frombytes("L", small, rng.randbytes(small[0] * small[1]))
        grain = raw.point(lambda v: 128 - _GRAIN + (v * (2 * _GRAIN + 1)) // 256)
        grain = grain.resize(size, Image.Resampling.NEAREST).convert("RGB")
        background = ImageChops.add(background, grain, 1.0, -128)  # background + grain - 128
    return background


def make_image(
    color: str,
    shape: str,
    size: tuple[int, int] = (224, 224),
    rng: Optional[random.Random] = None,
) -> Image.Image:
    """Draw one filled ``shape`` of ``color`` on a light background.

    ``size`` is (width, height) in pixels, at least 3x3. The shape's bounding box is a
    square with a side from ``shape_bounds(size)``, placed uniformly at random inside
    the frame. Returns an RGB ``PIL.Image`` of exactly ``size``.
    Raises ValueError for an unknown colour or shape.
    """
    if color not in COLORS:
        raise ValueError(f"color is {color!r}; use one of {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape is {shape!r}; use one of {', '.join(SHAPES)}")
    rng = rng or random.Random()
    width, height = size
    if width < 3 or height < 3:
        raise ValueError(f"size is {size!r}; use at least 3x3 pixels")
    image = _background((width, height), rng)
    lo, hi = shape_bounds(size)
    side = rng.randint(lo, hi)
    x0 = rng.randint(0, width - side)
    y0 = rng.randint(0, height - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    fill = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLORS[color])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def random_size(rng: random.Random, short_range=(48, 640), aspect_range=(0.5, 2.0)) -> tuple[int, int]:
    """A (width, height): log-uniform shorter side in ``short_range``, log-uniform aspect w/h."""
    short = math.exp(rng.uniform(math.log(short_range[0]), math.log(short_range[1])))
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
    if aspect >= 1:
        return round(short * aspect), round(short)
    return round(short), round(short / aspect)


def sample(rng: random.Random, size: Optional[tuple[int, int]] = None) -> tuple[Image.Image, str, str]:
    """A random (image, color, shape); ``size`` None draws one with ``random_size``."""
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    if size is None:
        size = random_size(rng)
    return make_image(color, shape, size, rng), color, shape
