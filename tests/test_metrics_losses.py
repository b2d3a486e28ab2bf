"""Metrics and losses on hand-built masks, with the edge cases spelled out in metrics.py."""

import numpy as np
import pytest
import torch

from lesionflow.losses import dice_bce_loss, soft_dice_loss
from lesionflow.metrics import aggregate, dice, hd95, image_metrics, iou


def square(size, top, left, side):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_dice_iou_on_overlapping_squares():
    a, b = square(20, 0, 0, 10), square(20, 0, 5, 10)  # 100 px each, 50 px overlap
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(50 / 150)


def blob(size, centre, radius):
    rr, cc = np.ogrid[:size[0], :size[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2


def monai_hd95(pred, truth, spacing=None) -> float:
    """The reference: MONAI's percentile-95 Hausdorff distance, Euclidean, one binary channel."""
    metrics = pytest.importorskip("monai.metrics", reason="monai is a dev dependency (.[dev])")
    return float(metrics.compute_hausdorff_distance(
        torch.from_numpy(pred[None, None]), torch.from_numpy(truth[None, None]),
        include_background=True, percentile=95, spacing=None if spacing is None else list(spacing)))


@pytest.mark.parametrize("case", ["shifted_square", "false_positive_blob", "two_blobs", "anisotropic"])
def test_hd95_matches_monai(case):
    if case == "shifted_square":
        pred, truth, spacing = square(40, 10, 14, 10), square(40, 10, 10, 10), None
    elif case == "false_positive_blob":
        # a perfect lesion plus a 3x3 false positive 50 px to its right: the blob's 8 edge pixels
        # are 8% of the prediction's edges, so pred→truth's 95th percentile is the blob's
        # distance; pooled with truth→pred's 96 zeros they were 4%, and the old HD95 said 0
        truth = square(100, 20, 10, 25)
        pred = truth | square(100, 30, 84, 3)
        spacing = None
    elif case == "two_blobs":
        truth = blob((80, 90), (20, 20), 8) | blob((80, 90), (55, 70), 6)
        pred = blob((80, 90), (22, 23), 9) | blob((80, 90), (50, 66), 5)
        spacing = None
    else:
        pred, truth, spacing = blob((60, 50), (30, 25), 10), blob((60, 50), (26, 28), 8), (0.5, 1.3)
    ours = hd95(pred, truth, spacing)
    assert ours == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)
    if case == "shifted_square":
        assert ours == pytest.approx(4.0)
    if case == "false_positive_blob":
        assert ours == pytest.approx(50, abs=1.5)


def test_worst_case_for_missed_lesion_and_false_alarm():
    empty, lesion = np.zeros((30, 40), bool), square(40, 2, 2, 3)[:30]
    assert hd95(empty, lesion) == hd95(lesion, empty) == pytest.approx(50.0)  # 30-40-50 diagonal
    assert hd95(empty, lesion, spacing=(0.5, 0.25)) == pytest.approx(np.hypot(15, 10))
    assert hd95(empty, empty) == 0.0
    assert image_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "truth_empty": 1.0,
                                           "pred_empty": 1.0, "spacing_known": 0.0}
    missed = image_metrics(empty, lesion, spacing=(0.5, 0.25))
    assert missed["dice"] == 0 and missed["iou"] == 0 and missed["spacing_known"] == 1.0
    assert missed["hd95"] == pytest.approx(np.hypot(15, 10))


def test_hd95_scales_with_spacing():
    pred, truth = blob((60, 60), (30, 30), 10), blob((60, 60), (33, 28), 7)
    assert hd95(pred, truth, spacing=(0.5, 0.5)) == pytest.approx(0.5 * hd95(pred, truth))
    # a shift along rows only is measured in row spacing
    a, b = square(40, 10, 10, 10), square(40, 14, 10, 10)
    assert hd95(a, b, spacing=(0.7, 3.0)) == pytest.approx(4 * 0.7)


def test_aggregate_per_type_and_overall():
    rows = [{"dice": 1.0, "iou": 1.0, "hd95": 0.0, "lesion_type": "a", "truth_empty": 1.0,
             "pred_empty": 1.0, "spacing_known": 1.0},
            {"dice": 0.0, "iou": 0.0, "hd95": 50.0, "lesion_type": "b", "truth_empty": 1.0,
             "pred_empty": 0.0, "spacing_known": 1.0},
            {"dice": 0.5, "iou": 0.25, "hd95": 2.0, "lesion_type": "b", "truth_empty": 0.0,
             "pred_empty": 0.0, "spacing_known": 0.0}]
    table = aggregate(rows)
    assert set(table["overall"]) == {"n", "dice", "iou", "hd95", "hd95_worst_case", "hd95_in_mm",
                                     "n_lesion_free", "false_positive_rate"}
    assert table["b"]["false_positive_rate"] == 1.0 and table["a"]["false_positive_rate"] == 0.0
    assert table["overall"]["n_lesion_free"] == 2 and table["overall"]["false_positive_rate"] == 0.5
    assert table["overall"]["n"] == 3 and table["overall"]["dice"] == pytest.approx(0.5)
    # the false alarm's worst case counts in the mean: no more rewarding a missing value
    assert table["b"]["hd95"] == pytest.approx(26.0) and table["b"]["hd95_worst_case"] == 1
    assert table["a"]["hd95_worst_case"] == 0 and table["a"]["dice"] == 1.0
    assert table["a"]["hd95_in_mm"] == 1.0 and table["b"]["hd95_in_mm"] == 0.0
    assert table["overall"]["hd95_in_mm"] == 0.0


def test_soft_dice_perfect_and_empty_targets():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 50  # confident logits matching the target, incl. the empty one
    assert soft_dice_loss(perfect, target).max() < 1e-3
    assert soft_dice_loss(-perfect, target)[0] > 0.9


def test_sample_weight_scales_contribution():
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    per = [dice_bce_loss(logits[i:i + 1], target[i:i + 1]).item() for i in range(2)]
    weighted = dice_bce_loss(logits, target, sample_weight=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((per[0] + 3 * per[1]) / 4, rel=1e-5)
