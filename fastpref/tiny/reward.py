"""The programmatic reward of the tiny preference set: how much vivid colour an image has."""

import numpy as np


def colourfulness(images: np.ndarray) -> np.ndarray:
    """Mean chroma (max minus min of R, G, B) over all pixels, one score in [0, 1] per image.

    ``images``: ``[N, H, W, 3]`` uint8 (or ``[H, W, 3]``). Grey pixels count 0 and dark pixels
    little (unlike HSV saturation, which a dark tinted background maximises), so the score
    grows with the shape's saturation and brightness and with its area: properties the
    captions leave free and the pretrained model samples across their whole range.
    """
    x = np.asarray(images, dtype=np.float64) / 255.0
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(x.shape)}")
    return (x.max(axis=-1) - x.min(axis=-1)).mean(axis=(1, 2))
