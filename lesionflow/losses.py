"""Segmentation losses. Per-sample weights let later steps weigh reviewer corrections higher.

Target pixels equal to ``IGNORE`` (-1: the unlabelled band of an area-ratio pseudo-label, see
``data/manifest.py``) add nothing to either term: no BCE, and neither side of the Dice ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """The mean over each pixel's k×k window (clipped at the border), as two 1-D passes: a k×k
    ``avg_pool2d`` on CPU took 60 % of a 256² training step; rows then columns give the same
    means (the clipped window is a rectangle) at 2k instead of k² reads per pixel."""
    x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)
    return F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)


def structure_pixel_weight(target: torch.Tensor) -> torch.Tensor:
    """Each pixel's weight in the structure loss: ``1 + 5·|local lesion share − its own label|``,
    0 where ``IGNORE``. It depends on the target alone, so deep supervision computes it once."""
    truth = target.clamp(min=0).float()
    local = box_mean(truth, max(3, target.shape[-1] // 11) | 1)
    return (1 + 5 * (local - truth).abs()) * (target != IGNORE).float()


def structure_loss(logits: torch.Tensor, target: torch.Tensor, *,
                   sample_weight: torch.Tensor | None = None,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Boundary-weighted BCE + weighted IoU (PraNet's "structure loss", Fan et al., MICCAI 2020).

    Pixels near the lesion's edge count up to 6× (``structure_pixel_weight``, computed here unless
    given), where a Dice- or BCE-trained model is loosest. The local window is ~1/11 of the image
    side (PraNet's 31 px at 352²). Ignore pixels weigh 0.
    """
    weight = structure_pixel_weight(target) if pixel_weight is None else pixel_weight
    truth = target.clamp(min=0).float()
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    wbce = (weight * bce).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1e-6)
    prob = torch.sigmoid(logits)
    inter = (prob * truth * weight).flatten(1).sum(1)
    union = ((prob + truth) * weight).flatten(1).sum(1)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return _weighted_mean(wbce + wiou, sample_weight)


def segmentation_losses(cfg: TrainConfig, outputs: Sequence[torch.Tensor], target: torch.Tensor,
                        sample_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The loss ``cfg.loss`` names, with ``cfg``'s weights, for each of ``outputs`` (logits at the
    target's size) against the one target."""
    if cfg.loss == "structure":
        pixel_weight = structure_pixel_weight(target)
        return [structure_loss(logits, target, sample_weight=sample_weight, pixel_weight=pixel_weight)
                for logits in outputs]
    return [dice_bce_loss(logits, target, dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight,
                          sample_weight=sample_weight) for logits in outputs]


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
