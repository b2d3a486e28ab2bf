"""Segmentation losses. Per-sample weights let later steps weigh reviewer corrections higher.

Target pixels equal to ``IGNORE`` (-1: the unlabelled band of an area-ratio pseudo-label, see
``data/manifest.py``) add nothing to either term: no BCE, and neither side of the Dice ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lesionflow.config import TrainConfig

IGNORE = -1  # target value of pixels that carry no label


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample ``1 - soft Dice`` (shape (B,)). The smoothing term makes an empty target with an
    empty prediction a zero loss, so lesion-free images (e.g. BUSI "normal") train correctly."""
    valid = (target != IGNORE).flatten(1)
    prob = torch.sigmoid(logits).flatten(1) * valid
    target = target.flatten(1).clamp(min=0)
    inter = (prob * target).sum(1)
    return 1 - (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 0.5,
    bce_weight: float = 0.5,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dice_weight * Dice + bce_weight * BCE``, averaged over samples with ``sample_weight``.
    BCE is the mean over each sample's labelled pixels (an all-ignore sample contributes 0)."""
    valid = (target != IGNORE).float()
    bce = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none") * valid
    bce = bce.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)
    per_sample = dice_weight * soft_dice_loss(logits, target) + bce_weight * bce
    return _weighted_mean(per_sample, sample_weight)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, *,
                   sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Boundary-weighted BCE + weighted IoU (PraNet's "structure loss", Fan et al., MICCAI 2020).

    Each pixel weighs ``1 + 5·|local lesion share − its own label|``: pixels near the lesion's
    edge count up to 6×, where a Dice- or BCE-trained model is loosest. The local window is ~1/11
    of the image side (PraNet's 31 px at 352²). Ignore pixels weigh 0.
    """
    valid = (target != IGNORE).float()
    truth = target.clamp(min=0).float()
    k = max(3, target.shape[-1] // 11) | 1
    local = F.avg_pool2d(truth, k, stride=1, padding=k // 2, count_include_pad=False)
    weight = (1 + 5 * (local - truth).abs()) * valid
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    wbce = (weight * bce).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1e-6)
    prob = torch.sigmoid(logits)
    inter = (prob * truth * weight).flatten(1).sum(1)
    union = ((prob + truth) * weight).flatten(1).sum(1)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return _weighted_mean(wbce + wiou, sample_weight)


def segmentation_loss(cfg: TrainConfig, logits: torch.Tensor, target: torch.Tensor,
                      sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss ``cfg.loss`` names, with ``cfg``'s weights."""
    if cfg.loss == "structure":
        return structure_loss(logits, target, sample_weight=sample_weight)
    return dice_bce_loss(logits, target, dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight,
                         sample_weight=sample_weight)


def _weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


def size_loss(logits: torch.Tensor, ratio: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``relu(r − e − a)² + relu(a − r − e)²``, a = mean lesion probability
    of the image: Kervadec et al.'s quadratic size penalty ("Constrained-CNN losses for weakly
    supervised segmentation", MedIA 2019). Zero anywhere inside the band r ± e, so an area ratio
    constrains how much lesion the network predicts without saying where. ``a`` is taken over every
    pixel (r is the lesion's share of the whole image, the ignore band included)."""
    area = torch.sigmoid(logits).flatten(1).mean(1)
    return (F.relu(ratio - error - area) ** 2 + F.relu(area - ratio - error) ** 2).mean()
