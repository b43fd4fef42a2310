"""The programmatic reward of the tiny preference set: how much vivid colour an image has."""

import numpy as np


def colourfulness(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation over all pixels, one score in [0, 1] per image.

    ``images``: ``[N, H, W, 3]`` uint8 (or ``[H, W, 3]``). Grey background counts 0, so the
    score grows with both the shape's saturation and its area: properties the captions leave
    free and the pretrained model samples across their whole range.
    """
    x = np.asarray(images, dtype=np.float64) / 255.0
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(x.shape)}")
    high, low = x.max(axis=-1), x.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0)
    return saturation.mean(axis=(1, 2))
