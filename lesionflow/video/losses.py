"""Losses of the next-frame model (seed 001), per sample so batches can be averaged or weighed.

Conventions (stated because the seed leaves them open):

- **φ is a distance**: 0 for identical inputs, larger = less alike. ``l1`` = mean |a − b|,
  ``l2`` = mean (a − b)², ``dice`` = 1 − soft Dice (for masks as probabilities in [0, 1]).
  Read as a distance, θ's hinge max(0, γ2 − φ) means "masks of dissimilar frames must differ by
  at least γ2" — with φ as a similarity it would reward identical masks, the opposite.
- **d is a similarity** of the two frames' *images*: 1 = identical. ``ssim`` = mean SSIM of the
  gray frames over 7×7 windows (structure, robust to global brightness changes); ``l1`` =
  1 − mean |I_a − I_b| for images in [0, 1]. Neither is differentiated: d is a fact about the data.
- θ(φ, d) = φ if d ≥ γ1 else max(0, γ2 − φ).

    >>> import torch
    >>> theta(torch.tensor([0.2, 0.2]), torch.tensor([0.9, 0.1]), gamma1=0.5, gamma2=0.3)
    tensor([0.2000, 0.1000])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lesionflow.errors import FrameShapeError
from lesionflow.losses import box_mean

PHIS = ("l1", "l2", "dice")
SIMILARITIES = ("ssim", "l1")
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise FrameShapeError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if a.dim() != 4:
        raise FrameShapeError(f"{what}: expected (B, C, H, W) tensors, got {a.dim()} dimensions")


def phi(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance (B,) between two (B, C, H, W) tensors; 0 means identical."""
    _check_pair(a, b, f"phi[{kind}]")
    if kind == "l1":
        return (a - b).abs().flatten(1).mean(1)
    if kind == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if kind == "dice":
        a, b = a.flatten(1), b.flatten(1)
        eps = 1e-6  # two empty masks are identical: distance 0
        return 1 - (2 * (a * b).sum(1) + eps) / (a.sum(1) + b.sum(1) + eps)
    raise ValueError(f"phi must be one of {PHIS}, not {kind!r}")


def similarity(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample image similarity d (B,) of two frame batches in [0, 1]; 1 means identical."""
    _check_pair(a, b, f"similarity[{kind}]")
    with torch.no_grad():
        if kind == "l1":
            return 1 - (a - b).abs().flatten(1).mean(1)
        if kind != "ssim":
            raise ValueError(f"similarity must be one of {SIMILARITIES}, not {kind!r}")
        x, y = a.mean(1, keepdim=True), b.mean(1, keepdim=True)

        def pool(t: torch.Tensor) -> torch.Tensor:
            return box_mean(t, 7)

        mx, my = pool(x), pool(y)
        vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
        ssim = ((2 * mx * my + _SSIM_C1) * (2 * cxy + _SSIM_C2)
                / ((mx**2 + my**2 + _SSIM_C1) * (vx + vy + _SSIM_C2)))
        return ssim.flatten(1).mean(1)


def theta(distance: torch.Tensor, d: torch.Tensor, *, gamma1: float, gamma2: float) -> torch.Tensor:
    """Similar frames (d ≥ γ1): their masks should agree, loss φ. Dissimilar frames: their masks
    should differ by at least the margin γ2, loss max(0, γ2 − φ)."""
    if distance.shape != d.shape:
        raise FrameShapeError(f"theta: φ {tuple(distance.shape)} and d {tuple(d.shape)} differ")
    return torch.where(d >= gamma1, distance, F.relu(gamma2 - distance))
