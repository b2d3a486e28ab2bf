"""Pseudo-labels from a trained model, and how good each one is (MISSION section 2, seed 000).

Scorers are small named callables (MONAI Label style), picked by ``pseudo_label.scorer``:

- ``tta``: agreement under test-time augmentation (``lesionflow/uncertainty.py``, shared with the
  review queue) — the model sees the image under the 8 flips / quarter turns; each prediction is
  mapped back and compared (Dice) with their consensus. Needs no ground truth, so it scores
  unlabelled images too.
- ``dice``: Dice of the prediction against the ground-truth mask; only where a mask exists
  (records without one fall back to ``tta``, and each record keeps the method actually used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lesionflow.metrics import dice
from lesionflow.models.segmenter import Segmenter
from lesionflow.uncertainty import agreement, tta_probabilities


@dataclass
class Prediction:
    mask: np.ndarray  # bool, the consensus of the TTA predictions: the pseudo-label
    tta_agreement: float  # mean Dice of each TTA prediction with the consensus


def predict_with_tta(model: Segmenter, image: np.ndarray, threshold: float = 0.5,
                     lesion_type: str | None = None) -> Prediction:
    consensus, agree = agreement(tta_probabilities(model, image, lesion_type), threshold)
    return Prediction(consensus, agree)


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
