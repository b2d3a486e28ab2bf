"""Synthetic videos from stills (seed 001, fig. 5) and the rollouts behind them.

G is rolled forward on its *own* outputs: (I_0, M_0) → (Î_1, M̂_1) → (Î_2, M̂_2) … From the
n generated frames ``select_frames`` keeps every k-th one, or greedily only frames whose image
similarity d to the last kept frame is below a threshold (``dissimilar``: variety) or at least
the threshold (``similar``: smooth clips). Frame 0 is the still itself and never re-emitted.

    >>> g = NextFrameModel("shared", base_channels=4, depth=1)
    >>> images, masks = rollout(g, torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8), n_steps=3)
    >>> tuple(images.shape), tuple(masks.shape)
    ((4, 1, 3, 8, 8), (4, 1, 1, 8, 8))
    >>> select_frames(images[:, 0], "every_k", every_k=2)
    [2]
"""

from __future__ import annotations

import numpy as np
import torch

from lesionflow.video.losses import similarity
from lesionflow.video.model import NextFrameModel


@torch.no_grad()
def rollout(model: NextFrameModel, image: torch.Tensor, mask: torch.Tensor, n_steps: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) images in [0, 1] and (B, 1, S, S) masks → (n+1, B, 3, S, S) frames and
    (n+1, B, 1, S, S) mask probabilities, index 0 being the input."""
    images, masks = [image], [mask]
    for _ in range(n_steps):
        pred_image, logits = model(images[-1], masks[-1])
        images.append(pred_image.clamp(0, 1))
        masks.append(torch.sigmoid(logits))
    return torch.stack(images), torch.stack(masks)


def select_frames(images: torch.Tensor, keep: str, *, every_k: int = 1, threshold: float = 0.9,
                  similarity_kind: str = "ssim") -> list[int]:
    """Indices (≥ 1) of the frames (T, 3, S, S) of one rollout to keep."""
    n = len(images)
    if keep == "every_k":
        return list(range(every_k, n, every_k))
    if keep not in ("dissimilar", "similar"):
        raise ValueError(f"keep must be every_k, dissimilar or similar, not {keep!r}")
    kept, last = [], 0
    for t in range(1, n):
        d = float(similarity(images[t:t + 1], images[last:last + 1], similarity_kind)[0])
        if (d < threshold) if keep == "dissimilar" else (d >= threshold):
            kept.append(t)
            last = t
    return kept


@torch.no_grad()
def propagate_masks(model: NextFrameModel, frames: np.ndarray, key_mask: np.ndarray, key: int,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Label propagation (seed 001, fig. 6): roll the key frame's mask forward to the last frame
    and backward to the first through the *real* frames; G's image output is discarded.
    frames (T, 3, S, S) in [0, 1], key_mask (1, S, S) → mask probabilities (T, 1, S, S)."""
    model = model.to(device).eval()
    video = torch.from_numpy(frames).to(device)
    out = torch.zeros((len(frames), 1, *frames.shape[-2:]), device=device)
    out[key] = torch.from_numpy(key_mask).to(device)
    for direction in (1, -1):
        t = key
        while 0 <= t + direction < len(frames):
            _, logits = model(video[t:t + 1], out[t:t + 1], video[t + direction:t + direction + 1])
            out[t + direction] = torch.sigmoid(logits)[0]
            t += direction
    return out.cpu().numpy()
