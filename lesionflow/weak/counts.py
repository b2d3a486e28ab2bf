"""From an area ratio to vertex labels: the seed's count rule and the "second annotation".

Vertices are ranked by lesion score. The top-k vertices cover a share ``cum[k]`` of the image;
n_fg is the k whose share is nearest to r − e, and the background starts at the k nearest to
r + e; the vertices between stay ``IGNORED`` (no loss). ``area=None`` weighs every vertex 1, so
``cum[k] = k/N`` and n_fg = round((r − e)·N), the seed's count by vertex number; passing the pixel
areas counts by area instead. Area is the default in ``weak_label.count_by`` because the ratio is
a pixel fraction and feature superpixels differ in size (a lesion can be one large vertex among
many small background ones), so a vertex count can miss the lesion's area by a factor of several.
Ties in "nearest" go to the smaller count.

    >>> import torch
    >>> vertex_labels(torch.arange(10.0), ratio=0.3, error=0.1).tolist()
    [0, 0, 0, 0, 0, 0, -1, -1, 1, 1]
"""

from __future__ import annotations

import torch

from lesionflow.errors import WeakLabelError

FOREGROUND, BACKGROUND, IGNORED = 1, 0, -1


def count_bounds(weights: torch.Tensor, ratio: float, error: float = 0.0) -> tuple[int, int]:
    """(n_fg, n_bg) for vertices already sorted by descending score with these weights."""
    if not 0 <= ratio <= 1 or not 0 <= error <= 1:
        raise WeakLabelError(f"area ratio {ratio} and its error {error} must lie in [0, 1]")
    if len(weights) == 0:
        raise WeakLabelError("no vertices to label")
    cum = torch.cat([weights.new_zeros(1), torch.cumsum(weights.double(), 0)])
    cum = cum / cum[-1]
    n_fg = int(torch.argmin((cum - max(ratio - error, 0.0)).abs()))
    k_hi = int(torch.argmin((cum - min(ratio + error, 1.0)).abs()))
    return n_fg, len(weights) - max(k_hi, n_fg)


def vertex_labels(scores: torch.Tensor, ratio: float, error: float = 0.0,
                  area: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) int8: ``FOREGROUND`` for the n_fg best-scored vertices, ``BACKGROUND`` for the n_bg
    worst, ``IGNORED`` between. ``area`` given → counts by pixel area, else by vertex number."""
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    weights = torch.ones(len(scores)) if area is None else area.detach()[order].cpu().double()
    n_fg, n_bg = count_bounds(weights, ratio, error)
    labels = torch.full((len(scores),), IGNORED, dtype=torch.int8, device=scores.device)
    labels[order[:n_fg]] = FOREGROUND
    labels[order[len(scores) - n_bg:]] = BACKGROUND
    return labels


def paint(labels: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
    """Vertex labels → pixel labels (same values), through the superpixel map."""
    return labels[superpixels]
