"""Per-image segmentation metrics on binary masks, and their per-lesion-type aggregation.

Conventions (stated because papers differ): both masks empty → Dice = IoU = 1 and HD95 = 0
(a correct "no lesion"); exactly one empty → Dice = IoU = 0 and HD95 = NaN (undefined, excluded
from HD95 means but counted in ``hd95_undefined``). HD95 is in pixels of the evaluated image.
``false_positive_rate`` is the share of lesion-free images on which any lesion pixel is predicted.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float:
    """95th percentile of the symmetric surface distances (pixels)."""
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return math.nan
    sp, st = _surface(pred), _surface(truth)
    to_truth = distance_transform_edt(~st)[sp]
    to_pred = distance_transform_edt(~sp)[st]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def image_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    pred, truth = pred.astype(bool), truth.astype(bool)
    return {"dice": dice(pred, truth), "iou": iou(pred, truth), "hd95": hd95(pred, truth),
            "truth_empty": float(not truth.any()), "pred_empty": float(not pred.any())}


def aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean metrics per ``lesion_type`` and ``overall`` from rows of image_metrics + lesion_type."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["lesion_type"]].append(row)
        groups["overall"].append(row)
    table = {}
    for name, items in sorted(groups.items()):
        finite_hd = [r["hd95"] for r in items if not math.isnan(r["hd95"])]
        lesion_free = [r for r in items if r["truth_empty"]]
        table[name] = {
            "n": len(items),
            "dice": float(np.mean([r["dice"] for r in items])),
            "iou": float(np.mean([r["iou"] for r in items])),
            "hd95": float(np.mean(finite_hd)) if finite_hd else math.nan,
            "hd95_undefined": len(items) - len(finite_hd),
            # images without a lesion on which the model still finds one (e.g. BUSI "normal")
            "n_lesion_free": len(lesion_free),
            "false_positive_rate": (float(np.mean([not r["pred_empty"] for r in lesion_free]))
                                    if lesion_free else math.nan),
        }
    return table
