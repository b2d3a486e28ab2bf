"""Metrics and losses on hand-built masks, with the edge cases spelled out in metrics.py."""

import math

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


def test_empty_conventions():
    empty, lesion = np.zeros((8, 8), bool), square(8, 2, 2, 3)
    assert image_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0,
                                           "truth_empty": 1.0, "pred_empty": 1.0}
    missed = image_metrics(empty, lesion)
    assert missed["dice"] == 0 and missed["iou"] == 0 and math.isnan(missed["hd95"])


def test_hd95_of_shifted_square_is_the_shift():
    a, b = square(40, 10, 10, 10), square(40, 10, 14, 10)
    assert hd95(a, b) == pytest.approx(4.0)
    assert hd95(a, a) == 0.0


def test_aggregate_per_type_and_overall():
    rows = [{"dice": 1.0, "iou": 1.0, "hd95": 0.0, "lesion_type": "a", "truth_empty": 1.0, "pred_empty": 1.0},
            {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "lesion_type": "b", "truth_empty": 1.0,
             "pred_empty": 0.0},
            {"dice": 0.5, "iou": 0.25, "hd95": 2.0, "lesion_type": "b", "truth_empty": 0.0, "pred_empty": 0.0}]
    table = aggregate(rows)
    assert table["b"]["false_positive_rate"] == 1.0 and table["a"]["false_positive_rate"] == 0.0
    assert table["overall"]["n_lesion_free"] == 2 and table["overall"]["false_positive_rate"] == 0.5
    assert table["overall"]["n"] == 3 and table["overall"]["dice"] == pytest.approx(0.5)
    assert table["b"]["hd95"] == pytest.approx(2.0) and table["b"]["hd95_undefined"] == 1
    assert table["a"]["dice"] == 1.0


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
