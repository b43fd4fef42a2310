"""Procedural captioned videos: one coloured shape sliding across a grey background.

The caption names the colour, the shape and the direction of motion ("a red circle moving
left"); the speed, the shape's size, saturation and position and the background's grey level are
left free, so a model trained on this set covers a range of the temporal reward
(``fastpref.tiny.motion_reward.motion_speed``) that the caption does not pin down.

Frames are rendered with 4x4 supersampling (soft edges), so a sub-pixel speed moves the shape
smoothly from frame to frame.
"""

import colorsys

import numpy as np

from .shapes import COLORS, SHAPES, _mask

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
"""Direction word -> unit (dx, dy) in pixels per frame (image axes: y grows downwards)."""
CAPTION_WORDS = ["a", *COLORS, *SHAPES, "moving", *DIRECTIONS]
NUM_FRAMES = 9  # frames of the bundled set: 1 + 4k, the Wan VAE's causal chunking
SIZE = 32
SPEED_RANGE = (0.25, 2.0)  # pixels per frame, uniform: the free property the reward reads
SUPERSAMPLE = 4


def caption(color: str, shape: str, direction: str) -> str:
    """The caption of a (colour, shape, direction) triple, e.g. ``"a red circle moving left"``."""
    return f"a {color} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of ``caption``: ``(color, shape, direction)``; ValueError for another text."""
    words = text.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"caption: expected 'a <color> <shape> moving <direction>', got {text!r}")
    color, shape, direction = words[1], words[2], words[4]
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"caption: unknown colour, shape or direction in {text!r}")
    return color, shape, direction


def random_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions with uniformly drawn colour, shape and direction."""
    colors = rng.choice(list(COLORS), size=n)
    shapes = rng.choice(SHAPES, size=n)
    directions = rng.choice(list(DIRECTIONS), size=n)
    return [caption(c, s, d) for c, s, d in zip(colors, shapes, directions, strict=True)]


def render_video(
    color: str,
    shape: str,
    direction: str,
    rng: np.random.Generator,
    *,
    size: int = SIZE,
    num_frames: int = NUM_FRAMES,
    speed: float | None = None,
) -> np.ndarray:
    """One ``[num_frames, size, size, 3]`` uint8 RGB video of ``caption(color, shape, direction)``.

    The shape moves ``speed`` pixels per frame (default: uniform in ``SPEED_RANGE``) along the
    direction and stays fully inside the frame; its start is uniform over the positions that
    allow this."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    grey = rng.uniform(0.3, 0.7)
    saturation = rng.uniform(0.6, 1.0)
    radius = rng.uniform(0.14, 0.22) * size
    speed = rng.uniform(*SPEED_RANGE) if speed is None else float(speed)
    travel = speed * (num_frames - 1)
    if travel > size - 2 * radius:
        raise ValueError(f"speed {speed} moves the shape out of a {size} px frame in {num_frames} frames")
    dx, dy = DIRECTIONS[direction]
    along = rng.uniform(radius, size - radius - travel)  # start coordinate along the motion
    across = rng.uniform(radius, size - radius)
    start_along = along if dx + dy > 0 else size - along  # moving left/up starts from the far side
    rgb = np.asarray(colorsys.hsv_to_rgb(COLORS[color], saturation, 0.9))
    fine = size * SUPERSAMPLE
    frames = np.empty((num_frames, size, size, 3), dtype=np.float64)
    for f in range(num_frames):
        position = start_along + f * speed * (dx + dy)
        cx, cy = (position, across) if dx else (across, position)
        mask = _mask(shape, fine, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE)
        cover = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        frames[f] = grey * (1 - cover) + rgb * cover
    return np.round(frames * 255).astype(np.uint8)


def random_videos(n: int, seed: int, *, size: int = SIZE, num_frames: int = NUM_FRAMES):
    """``n`` videos ``[n, num_frames, size, size, 3]`` uint8, their captions and speeds (pixels per
    frame, ``[n]`` float64), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    prompts = random_prompts(n, rng)
    speeds = rng.uniform(*SPEED_RANGE, size=n)
    videos = np.stack(
        [
            render_video(*parse_caption(p), rng, size=size, num_frames=num_frames, speed=s)
            for p, s in zip(prompts, speeds, strict=True)
        ]
    )
    return videos, prompts, speeds
