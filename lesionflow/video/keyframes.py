"""Key frames: the frame of a video whose mask the others are rolled from (seed 001).

Automatic choice scores each *labelled* frame on three criteria, each min–max normalised within
the video so the weights trade comparable quantities:

- sharpness: variance of the Laplacian of the gray frame (blurred frames give blurred masks);
- lesion position: 1 − distance of the mask centroid from the image centre, over the half
  diagonal (a central lesion is fully in view; an edge one may be leaving it);
- brightness: 1 − 2·|mean gray − 0.5| (neither under- nor over-exposed).

A frame without a mask can't be a key frame: there would be nothing to propagate.

    >>> import numpy as np
    >>> frames = np.zeros((2, 3, 8, 8), np.float32); frames[1, :, ::2] = 1.0   # frame 1 is sharp
    >>> masks = np.zeros((2, 1, 8, 8), np.float32); masks[:, :, 3:5, 3:5] = 1
    >>> choose_key_frame(frames, masks, np.array([True, True]))
    1
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import laplace

from lesionflow.errors import KeyFrameError


def sharpness(gray: np.ndarray) -> float:
    return float(laplace(gray.astype(np.float64)).var())


def centrality(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask > 0.5)
    if not len(ys):
        return 0.0
    h, w = mask.shape
    dist = np.hypot(ys.mean() - (h - 1) / 2, xs.mean() - (w - 1) / 2)
    return float(1 - dist / np.hypot(h / 2, w / 2))


def brightness(gray: np.ndarray) -> float:
    return float(1 - 2 * abs(gray.mean() - 0.5))


def _normalise(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def key_frame_scores(frames: np.ndarray, masks: np.ndarray, known: np.ndarray, *,
                     sharpness_weight: float = 1.0, centrality_weight: float = 1.0,
                     brightness_weight: float = 1.0) -> np.ndarray:
    """Score per frame (T,) for frames (T, C, H, W) in [0, 1] and masks (T, 1, H, W); frames
    without a known mask score −inf."""
    idx = np.flatnonzero(known)
    if not len(idx):
        raise KeyFrameError("no frame of this video has a mask, so none can be a key frame")
    gray = frames[idx].mean(axis=1)
    criteria = np.stack([
        _normalise(np.array([sharpness(g) for g in gray])),
        _normalise(np.array([centrality(masks[i, 0]) for i in idx])),
        _normalise(np.array([brightness(g) for g in gray])),
    ])
    weights = np.array([sharpness_weight, centrality_weight, brightness_weight])
    scores = np.full(len(frames), -np.inf)
    scores[idx] = weights @ criteria
    return scores


def choose_key_frame(frames: np.ndarray, masks: np.ndarray, known: np.ndarray, **weights: float) -> int:
    """Index of the best-scoring labelled frame (the earliest one on ties)."""
    return int(np.argmax(key_frame_scores(frames, masks, known, **weights)))
