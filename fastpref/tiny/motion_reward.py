"""The temporal reward of the tiny video preference set: how fast the shape moves.

A property of the motion, not of any single frame: every frame of a fast and of a slow video can
be identical up to the shape's position. The procedural training videos draw the speed uniformly
(``fastpref.tiny.motion.SPEED_RANGE``) whatever the caption says, so the pretrained model has no
reason to favour fast motion.
"""

import numpy as np

CHROMA_FLOOR = 0.08  # chroma (max - min of R, G, B) below this counts as background


def centroids(videos: np.ndarray) -> np.ndarray:
    """Per-frame centre of the coloured pixels: ``[N, F, 2]`` float64 ``(x, y)`` in pixels.

    ``videos``: ``[N, F, H, W, 3]`` uint8. Each pixel weighs its chroma above ``CHROMA_FLOOR``
    (the grey background weighs 0); a frame with no coloured pixel gets the frame centre."""
    x = np.asarray(videos, dtype=np.float64) / 255.0
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"videos must be [N, F, H, W, 3], got shape {tuple(x.shape)}")
    weight = np.clip(x.max(axis=-1) - x.min(axis=-1) - CHROMA_FLOOR, 0.0, None)  # [N, F, H, W]
    h, w = weight.shape[-2:]
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    total = weight.sum(axis=(-2, -1))
    safe = np.where(total > 0, total, 1.0)
    cx = np.where(total > 0, (weight.sum(axis=-2) * xs).sum(axis=-1) / safe, w / 2)
    cy = np.where(total > 0, (weight.sum(axis=-1) * ys).sum(axis=-1) / safe, h / 2)
    return np.stack([cx, cy], axis=-1)


def motion_speed(videos: np.ndarray) -> np.ndarray:
    """Speed of the shape, pixels per frame, one score ``>= 0`` per video (``[N]`` float64).

    The least-squares velocity of the coloured centroid (``centroids``) over the frames, i.e. the
    slope of a straight-line fit of x(t) and y(t), and its length. A fit over all frames rather
    than first-to-last displacement, so one badly decoded frame moves the score little.
    ``videos``: ``[N, F, H, W, 3]`` uint8 with ``F >= 2``."""
    c = centroids(videos)
    frames = c.shape[1]
    if frames < 2:
        raise ValueError(f"videos need at least 2 frames for a speed, got {frames}")
    t = np.arange(frames, dtype=np.float64)
    t = t - t.mean()
    velocity = (c * t[None, :, None]).sum(axis=1) / (t**2).sum()  # [N, 2]
    return np.linalg.norm(velocity, axis=-1)
