"""How unsure a model is of one image's mask: the measures pseudo-labelling, serving and the review
queue share, so a score means the same wherever it is read.

- **TTA agreement**: the model sees the image under the 8 flips / quarter turns of the square;
  each probability map is mapped back and thresholded, and its Dice with the consensus (the mean
  map thresholded) is averaged. 1: every view gives the same mask. Costs 8 segmentations.
- **Predictive entropy**: the mean binary entropy of the lesion probability over the pixels, in
  bits (0: every pixel decided, 1: every pixel a coin toss). Free: one map, no extra inference.
- **Ambiguous area**: the share of the region that might be lesion (p > threshold - band) whose
  probability lies within ``AMBIGUOUS_BAND`` of the threshold: how much of the lesion the model
  cannot place. Unlike the entropy it does not shrink when the lesion is small in a large image.

The two per-map measures read at most ``SAMPLE_SIDE``² pixels of a strided view: a 4096² image
costs what a 256² one does (about a millisecond), so the server can afford them per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesionflow.metrics import dice

# (k quarter turns, horizontal flip): the dihedral group of the square
TTA_TRANSFORMS = [(k, flip) for k in range(4) for flip in (False, True)]
AMBIGUOUS_BAND = 0.25  # |p - threshold| below this: the model cannot tell lesion from background
SAMPLE_SIDE = 256
# binary entropy at p = i / 1024: a table lookup is ~10x cheaper than two logarithms per pixel,
# and off by < 0.01 bits near p = 0 or 1 (a few 1e-3 elsewhere)
_BINS = 1024
_P = np.clip(np.linspace(0, 1, _BINS + 1), 1e-7, 1 - 1e-7)
_ENTROPY = -(_P * np.log2(_P) + (1 - _P) * np.log2(1 - _P))


def _forward(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _inverse(prob: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = prob[:, ::-1] if flip else prob
    return np.ascontiguousarray(np.rot90(out, -k, axes=(0, 1)))


def tta_probabilities(model, image: np.ndarray, lesion_type: str | None = None) -> list[np.ndarray]:
    """The probability maps of the 8 TTA views, each mapped back onto ``image``; ``model`` is
    anything with ``predict_proba(images, lesion_types)`` (a ``Segmenter``, a router, their ONNX
    Runtime twins)."""
    views = [_forward(image, k, flip) for k, flip in TTA_TRANSFORMS]
    probs = model.predict_proba(views, lesion_types=[lesion_type] * len(views))
    return [_inverse(p, k, flip) for p, (k, flip) in zip(probs, TTA_TRANSFORMS, strict=True)]


def agreement(probs: list[np.ndarray], threshold: float) -> tuple[np.ndarray, float]:
    """(consensus mask, mean Dice of each view's mask with it)."""
    consensus = np.mean(probs, axis=0) > threshold
    return consensus, float(np.mean([dice(p > threshold, consensus) for p in probs]))


def _histogram(prob: np.ndarray) -> np.ndarray:
    """Pixel counts per probability bin (``_BINS`` + 1 bins) of a strided sample of ``prob``."""
    step = max(1, -(-max(prob.shape) // SAMPLE_SIDE))
    index = (np.clip(prob[::step, ::step], 0, 1) * _BINS + 0.5).astype(np.intp)
    return np.bincount(index.ravel(), minlength=_BINS + 1)


def map_uncertainty(prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """(predictive entropy, ambiguous area) of one probability map, from one histogram:

    - the mean binary entropy of the per-pixel lesion probability, in bits (0 decided … 1 coin
      toss);
    - the share of the possibly-lesion pixels (p > threshold - band) that are undecided
      (|p - threshold| < band); 0 when no pixel might be lesion.
    """
    counts = _histogram(prob)
    entropy = float(counts @ _ENTROPY / counts.sum())
    low, high = (threshold - AMBIGUOUS_BAND) * _BINS, (threshold + AMBIGUOUS_BAND) * _BINS
    bins = np.arange(_BINS + 1)
    possible = counts[bins > low].sum()
    undecided = counts[(bins > low) & (bins < high)].sum()
    return entropy, float(undecided / possible) if possible else 0.0


@dataclass(frozen=True)
class Uncertainty:
    """Everything one TTA pass tells about an image (the review queue's candidate features)."""

    tta_agreement: float
    entropy: float  # of the mean TTA map
    ambiguous_area: float  # of the mean TTA map


def measure(model, image: np.ndarray, threshold: float, lesion_type: str | None = None) -> Uncertainty:
    probs = tta_probabilities(model, image, lesion_type)
    _, agree = agreement(probs, threshold)
    return Uncertainty(agree, *map_uncertainty(np.mean(probs, axis=0), threshold))
