"""Which samples of one prompt become preference pairs, from their rewards."""

from __future__ import annotations

import itertools

import numpy as np

PAIRINGS = ("best_worst", "all")
"""``--pairing``: ``best_worst``: the prompt's best sample against its worst; ``all``: every
pair of its samples. Either keeps a pair only when its reward margin exceeds ``--min_margin``."""


def select_pairs(
    scores: np.ndarray, pairing: str = "best_worst", min_margin: float | None = 0.0
) -> list[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, of sample indices of one prompt whose ``scores`` (``[K]``,
    K >= 2) make them a pair. Kept when ``|scores[a] - scores[b]| > min_margin`` (so the
    default 0 drops exact ties); ``min_margin=None`` keeps every candidate pair, ties included
    (the bundled tiny set's rule). ``best_worst`` with all scores equal pairs samples 0 and 1."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"scores must be [K] with K >= 2 samples of one prompt, got shape {scores.shape}")
    if pairing == "best_worst":
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        candidates = [(0, 1)] if best == worst else [tuple(sorted((best, worst)))]
    elif pairing == "all":
        candidates = list(itertools.combinations(range(len(scores)), 2))
    else:
        raise ValueError(f"--pairing: expected one of {list(PAIRINGS)}, got {pairing!r}")
    if min_margin is None:
        return candidates
    return [(a, b) for a, b in candidates if abs(scores[a] - scores[b]) > min_margin]


def label_0(score_0: float, score_1: float) -> float:
    """Pick-a-Pic ``label_0``: 1.0 when image 0 scores higher, 0.0 when lower, 0.5 on a tie."""
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5
