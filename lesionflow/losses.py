"""Segmentation losses. Per-sample weights let later steps weigh reviewer corrections higher.

Target pixels equal to ``IGNORE`` (-1: the unlabelled band of an area-ratio pseudo-label, see
``data/manifest.py``) add nothing to either term: no BCE, and neither side of the Dice ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()
