"""Pseudo-labels from a trained model, and how good each one is (MISSION section 2, seed 000).

Scorers are small named callables (MONAI Label style), picked by ``pseudo_label.scorer``:

- ``tta``: agreement under test-time augmentation — the model sees the image under the 8 flips /
  quarter turns; each prediction is mapped back and compared (Dice) with their consensus. Needs
  no ground truth, so it scores unlabelled images too.
- ``dice``: Dice of the prediction against the ground-truth mask; only where a mask exists
  (records without one fall back to ``tta``, and each record keeps the method actually used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lesionflow.metrics import dice
from lesionflow.models.segmenter import Segmenter

# (k quarter turns, horizontal flip): the dihedral group of the square
TTA_TRANSFORMS = [(k, flip) for k in range(4) for flip in (False, True)]


def _forward(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(image, k, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _inverse(prob: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = prob[:, ::-1] if flip else prob
    return np.ascontiguousarray(np.rot90(out, -k, axes=(0, 1)))


@dataclass
class Prediction:
    mask: np.ndarray  # bool, the consensus of the TTA predictions: the pseudo-label
    tta_agreement: float  # mean Dice of each TTA prediction with the consensus


def predict_with_tta(model: Segmenter, image: np.ndarray, threshold: float = 0.5,
                     lesion_type: str | None = None) -> Prediction:
    views = [_forward(image, k, flip) for k, flip in TTA_TRANSFORMS]
    probs = model.predict_proba(views, lesion_types=[lesion_type] * len(views))
    probs = [_inverse(p, k, flip) for p, (k, flip) in zip(probs, TTA_TRANSFORMS, strict=True)]
    consensus = np.mean(probs, axis=0) > threshold
    agreement = float(np.mean([dice(p > threshold, consensus) for p in probs]))
    return Prediction(consensus, agreement)


Scorer = Callable[[Prediction, np.ndarray | None], float | None]


def tta_score(prediction: Prediction, truth: np.ndarray | None) -> float:
    return prediction.tta_agreement


def dice_score(prediction: Prediction, truth: np.ndarray | None) -> float | None:
    return None if truth is None else dice(prediction.mask, truth)


SCORERS: dict[str, Scorer] = {"tta": tta_score, "dice": dice_score}


def score(method: str, prediction: Prediction, truth: np.ndarray | None) -> tuple[float, str]:
    """(score, method actually used): ``dice`` without a mask falls back to ``tta``."""
    value = SCORERS[method](prediction, truth)
    if value is None:
        return tta_score(prediction, truth), "tta"
    return value, method


def quality_cutoff(scores: list[float], threshold: float | None, quantile: float | None) -> float:
    """The score at or above which task data counts as good: a fixed threshold, or the score
    quantile of this batch (e.g. 0.3 → the best 70 % are good)."""
    if threshold is not None:
        return threshold
    return float(np.quantile(scores, quantile)) if scores else 0.0
