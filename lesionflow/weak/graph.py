"""The superpixel graph: vertices = superpixels (mean feature, pixel area), edges = superpixels
whose pixels touch, weight exp(-d²/σ²) of the Euclidean distance d between vertex features.

σ defaults to the median edge distance of the image: features change while the network trains,
and a fixed σ would drift from "every weight ≈ 1" to "every weight ≈ 0"; the median keeps the
weights spread around exp(-1) at every epoch. Weights are computed from detached features (the
graph is an input to the GCN, not something it optimises); vertex features keep their gradient so
the GCN's loss reaches the segmentation network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesionflow.errors import WeakLabelError

_SHIFTS = {4: [(0, 1), (1, 0)], 8: [(0, 1), (1, 0), (1, 1), (1, -1)]}


@dataclass
class Graph:
    labels: torch.Tensor  # (H, W) long, superpixel id 0..N-1 of every pixel
    x: torch.Tensor  # (N, C) mean feature per vertex (differentiable)
    edge_index: torch.Tensor  # (2, E) long, each undirected edge once, row 0 < row 1
    edge_weight: torch.Tensor  # (E,)
    area: torch.Tensor  # (N,) pixel count per vertex

    @property
    def n(self) -> int:
        return self.x.shape[0]


def region_adjacency(labels: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """(2, E) pairs (i < j, sorted, unique) of labels that are neighbours in the pixel grid."""
    if connectivity not in _SHIFTS:
        raise WeakLabelError(f"connectivity must be 4 or 8, got {connectivity}")
    n = int(labels.max()) + 1
    pairs = []
    for dy, dx in _SHIFTS[connectivity]:
        a = labels[: labels.shape[0] - dy, max(0, -dx): labels.shape[1] - max(0, dx)]
        b = labels[dy:, max(0, dx): labels.shape[1] + min(0, dx) or None]
        differ = a != b
        pairs.append(torch.stack([a[differ], b[differ]]))
    p = torch.cat(pairs, 1)
    lo, hi = torch.minimum(p[0], p[1]), torch.maximum(p[0], p[1])
    key = torch.unique(lo * n + hi)
    return torch.stack([key // n, key % n])


def mean_features(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) features, (H, W) labels → ((N, C) per-vertex mean, (N,) pixel counts)."""
    n = int(labels.max()) + 1
    flat = labels.flatten()
    area = torch.bincount(flat, minlength=n)
    sums = torch.zeros(n, features.shape[0], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, flat, features.flatten(1).T)
    return sums / area[:, None].clamp(min=1), area


def build_graph(features: torch.Tensor, labels: torch.Tensor, sigma: float | None = None,
                connectivity: int = 4) -> Graph:
    if features.shape[1:] != labels.shape:
        raise WeakLabelError(f"features {tuple(features.shape[1:])} and superpixel labels "
                             f"{tuple(labels.shape)} differ in size")
    x, area = mean_features(features, labels)
    edges = region_adjacency(labels, connectivity)
    xd = x.detach()
    d2 = (xd[edges[0]] - xd[edges[1]]).pow(2).sum(1)
    if sigma is None:
        sigma2 = d2.sqrt().median().pow(2).clamp(min=1e-12) if len(d2) else torch.tensor(1.0)
    else:
        sigma2 = torch.tensor(float(sigma) ** 2)
    return Graph(labels, x, edges, torch.exp(-d2 / sigma2), area)


def normalized_adjacency(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse D^-1/2 (A + I) D^-1/2 (Kipf & Welling 2017), A symmetric from the undirected edges."""
    loops = torch.arange(n, device=edge_index.device)
    rows = torch.cat([edge_index[0], edge_index[1], loops])
    cols = torch.cat([edge_index[1], edge_index[0], loops])
    values = torch.cat([edge_weight, edge_weight, torch.ones(n, device=edge_weight.device)])
    degree = torch.zeros(n, device=values.device).index_add(0, rows, values)
    norm = degree.rsqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), norm[rows] * values * norm[cols],
                                   (n, n), check_invariants=False).coalesce()


def batch_adjacency(graphs: list[Graph]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several graphs as one: stacked vertex features and a block-diagonal normalised adjacency
    (the way graph libraries batch), so a batch of images costs one sparse product per layer."""
    offsets = torch.cumsum(torch.tensor([0] + [g.n for g in graphs]), 0)
    edges = torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets, strict=False)], 1)
    weights = torch.cat([g.edge_weight for g in graphs])
    return torch.cat([g.x for g in graphs]), normalized_adjacency(edges, weights, int(offsets[-1]))
