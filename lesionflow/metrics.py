"""Per-image segmentation metrics on binary masks, and their per-lesion-type aggregation.

Conventions (stated because papers differ): both masks empty → Dice = IoU = 1 and HD95 = 0 (a
correct "no lesion"); exactly one empty (a missed lesion or a false alarm) → Dice = IoU = 0 and
HD95 = the image diagonal, the worst case, so predicting nothing is never rewarded with a missing
value. HD95 follows MONAI (``compute_hausdorff_distance(percentile=95)``, Euclidean): the larger of
the two directed 95th percentiles of edge-to-edge distances. It is in mm when the pixel spacing is
given, else in pixels of the evaluated image. ``false_positive_rate`` is the share of lesion-free
images on which any lesion pixel is predicted. ``temporal_consistency`` is the mean Dice of
consecutive masks of a video (1: no flicker), averaged per sequence so long videos do not outweigh
short ones.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Lesion pixels with a background 4-neighbour (outside the image counts as background):
    MONAI's ``get_mask_edges``, the mask XOR its binary erosion."""
    return mask & ~binary_erosion(mask, border_value=0)


def _directed_p95(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, float]) -> float:
    """95th percentile of the exact Euclidean distance from each ``src`` edge to the nearest
    ``dst`` edge (linear interpolation, as ``torch.quantile`` in MONAI)."""
    return float(np.percentile(distance_transform_edt(~dst, sampling=spacing)[src], 95))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] | None = None) -> float:
    """MONAI's HD95: max of the directed 95th percentiles, pred→truth and truth→pred.

    ``spacing`` is the (row, column) size of one pixel in mm; without it the result is in pixels.
    One empty mask gives the worst case, the image diagonal; both empty give 0.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    rows, cols = (1.0, 1.0) if spacing is None else spacing
    if not pred.any() or not truth.any():
        return math.hypot(pred.shape[0] * rows, pred.shape[1] * cols)
    ep, et = _edges(pred), _edges(truth)
    return max(_directed_p95(ep, et, (rows, cols)), _directed_p95(et, ep, (rows, cols)))


def image_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] | None = None
                  ) -> dict[str, float]:
    """One row for ``aggregate``; ``spacing`` as in ``hd95``."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    return {"dice": dice(pred, truth), "iou": iou(pred, truth), "hd95": hd95(pred, truth, spacing),
            "truth_empty": float(not truth.any()), "pred_empty": float(not pred.any()),
            "spacing_known": float(spacing is not None)}


def temporal_consistency(masks_by_sequence: Mapping[Hashable, Iterable[tuple[int, np.ndarray]]]) -> float:
    """Mean over sequences of the mean Dice between consecutive masks, from ``(frame_index, mask)``
    pairs per sequence in any order (sorted here); consecutive means next among the masks given, so
    pass only scored frames. Sequences with fewer than 2 masks add nothing; none with a pair: NaN."""
    return sequence_mean({seq: [dice(a, b) for (_, a), (_, b) in
                                itertools.pairwise(sorted(frames, key=lambda f: f[0]))]
                          for seq, frames in masks_by_sequence.items()})


def sequence_mean(pair_dice_by_sequence: Mapping[Hashable, list[float]]) -> float:
    """Mean over sequences of their mean pair Dice (NaN when no sequence has a pair)."""
    means = [float(np.mean(d)) for d in pair_dice_by_sequence.values() if d]
    return float(np.mean(means)) if means else math.nan


def _temporal(items: list[dict]) -> tuple[float, float]:
    """Predicted and true temporal consistency over the pairs of ``items`` whose two frames are
    both among them (rows of video frames carry ``sequence``, ``prev_id`` and the pair's Dice)."""
    ids = {r["id"] for r in items}
    pred: dict[str, list[float]] = defaultdict(list)
    truth: dict[str, list[float]] = defaultdict(list)
    for r in items:
        if r.get("prev_id") in ids:
            pred[r["sequence"]].append(r["temporal_pred"])
            truth[r["sequence"]].append(r["temporal_truth"])
    return sequence_mean(pred), sequence_mean(truth)


def aggregate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean metrics per ``lesion_type`` and ``overall`` from rows of image_metrics + lesion_type.

    ``hd95`` averages every image, worst cases included; ``hd95_worst_case`` counts the images
    that got the worst case (missed lesion or false alarm). ``hd95_in_mm`` is 1.0 when every row
    of the group had a pixel spacing (``spacing_known``), else 0.0 and the mean is in pixels —
    or mixes units, so compare such groups with care. When any row pairs with its previous video
    frame, every group gets ``temporal_dice`` (predicted masks' temporal consistency, NaN for a
    group without pairs) and ``temporal_gap`` (that minus the truth's own: positive is smoother
    than the truth, negative flickers); tables of stills keep their columns.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["lesion_type"]].append(row)
        groups["overall"].append(row)
    table = {}
    for name, items in sorted(groups.items()):
        lesion_free = [r for r in items if r["truth_empty"]]
        table[name] = {
            "n": len(items),
            "dice": float(np.mean([r["dice"] for r in items])),
            "iou": float(np.mean([r["iou"] for r in items])),
            "hd95": float(np.mean([r["hd95"] for r in items])),
            "hd95_worst_case": sum(1 for r in items if r["truth_empty"] != r["pred_empty"]),
            "hd95_in_mm": float(all(r.get("spacing_known") for r in items)),
            # images without a lesion on which the model still finds one (e.g. BUSI "normal")
            "n_lesion_free": len(lesion_free),
            "false_positive_rate": (float(np.mean([not r["pred_empty"] for r in lesion_free]))
                                    if lesion_free else math.nan),
        }
    if any(r.get("prev_id") is not None for r in rows):
        for name, items in groups.items():
            pred, truth = _temporal(items)
            table[name]["temporal_dice"], table[name]["temporal_gap"] = pred, pred - truth
    return table
