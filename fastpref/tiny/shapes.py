"""Procedural captioned images: one coloured shape on a grey background.

The caption names the colour and the shape ("a red circle"); the shape's size, saturation
and position and the background's grey level are left free, so a model trained on this set
covers a range of the reward (``fastpref.tiny.reward``) that the caption does not pin down.
"""

import colorsys

import numpy as np

COLORS = {  # name -> hue in [0, 1)
    "red": 0.0,
    "orange": 0.08,
    "yellow": 0.16,
    "green": 0.33,
    "cyan": 0.5,
    "blue": 0.64,
    "purple": 0.78,
    "pink": 0.9,
}
SHAPES = ("circle", "square", "triangle")
CAPTION_WORDS = ["a", *COLORS, *SHAPES]


def caption(color: str, shape: str) -> str:
    """The caption of a (colour, shape) pair, e.g. ``"a red circle"``."""
    return f"a {color} {shape}"


def random_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions with uniformly drawn colour and shape."""
    colors = rng.choice(list(COLORS), size=n)
    shapes = rng.choice(SHAPES, size=n)
    return [caption(c, s) for c, s in zip(colors, shapes, strict=True)]


def _mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        half = radius * 0.85
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":  # apex up, base at cy + radius/2
        top, bottom = cy - radius, cy + radius * 0.6
        half_width = (y - top) / (bottom - top) * radius
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(color: str, shape: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 RGB image of ``caption(color, shape)``."""
    grey = rng.uniform(0.2, 0.8)
    saturation = rng.uniform(0.2, 1.0)
    radius = rng.uniform(0.18, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    rgb = colorsys.hsv_to_rgb(COLORS[color], saturation, 0.9)
    image = np.full((size, size, 3), grey, dtype=np.float64)
    image[_mask(shape, size, cx, cy, radius)] = rgb
    return np.round(image * 255).astype(np.uint8)


def random_dataset(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """``n`` images ``[n, size, size, 3]`` uint8 and their captions, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    prompts = random_prompts(n, rng)
    images = np.stack([render(*p.split()[1:], rng, size=size) for p in prompts])
    return images, prompts
