"""Area-ratio weak labels → pixel pseudo-labels (MISSION section 2, seed 004).

Pipeline per image: the segmentation network's per-pixel features (``UNet.features``, plus the
normalised colour) → superpixels by k-means on [features, position] (``superpixels``) → a region
adjacency graph with weights exp(-d²/σ²) (``graph``) → a small GCN scores every vertex
(``gcn``) → the area ratio r (± estimate error e) turns the ranking into foreground / background /
ignored vertices (``counts``) → painted back to pixels, that "second annotation" trains the
network and the GCN together, re-ranked every epoch (``train``).
"""

from lesionflow.weak.counts import (
           BACKGROUND,
           FOREGROUND,
           IGNORED,
           count_bounds,
           paint,
           vertex_labels,
)
from lesionflow.weak.gcn import GCN
from lesionflow.weak.graph import (
           Graph,
           batch_adjacency,
           build_graph,
           normalized_adjacency,
           region_adjacency,
)
from lesionflow.weak.superpixels import superpixels

__all__ = ["BACKGROUND", "FOREGROUND", "GCN", "IGNORED", "Graph", "batch_adjacency", "build_graph",
           "count_bounds", "normalized_adjacency", "paint", "region_adjacency", "superpixels",
           "vertex_labels"]
