"""A small graph convolutional network in plain torch (sparse matrix products).

Why not torch-geometric: it is not installed, its compiled extras follow torch releases (torch
2.13 here), and these graphs are tiny (tens to hundreds of vertices per image): a GCN layer is one
``torch.sparse.mm`` with the normalised adjacency, which runs unchanged on CPU and CUDA.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


class GCN(nn.Module):
    """``layers`` propagations H ← ReLU(Â H W), the last one to one logit per vertex.

    >>> import torch
    >>> adj = torch.eye(3).to_sparse()
    >>> GCN(4, hidden=8, layers=2)(torch.zeros(3, 4), adj).shape
    torch.Size([3])
    """

    def __init__(self, in_channels: int, hidden: int = 32, layers: int = 2):
        super().__init__()
        dims = [in_channels] + [hidden] * (layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.relu(torch.sparse.mm(adj, layer(x)))
        return torch.sparse.mm(adj, self.out(x)).squeeze(1)
