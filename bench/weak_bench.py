"""Cost of the weak-label graph per image at 256×256: superpixels + graph + GCN, against one
forward pass of the segmentation network (the default model of params.yaml, batch 1, no grad).

The graph path starts from the network's features (they come with the forward pass the graph
needs anyway), so its cost is what the weak labels *add*. Parts run interleaved (forward,
superpixels, graph, GCN, forward, ...) so machine noise hits all alike; medians and ratios are
printed. One thread, like the experiments on the shared machine.

    python bench/weak_bench.py [--size 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter
from lesionflow.weak.graph import batch_adjacency, build_graph
from lesionflow.weak.superpixels import superpixels
from lesionflow.weak.train import WeakGraphModel


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def graph_of(features: torch.Tensor, labels: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_adjacency([build_graph(features, labels, cfg.sigma, cfg.connectivity)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = config.load(REPO / "params.yaml")
    cfg = params.weak_label
    segmenter = Segmenter(build_model(params.model), args.size, [128.0] * 3, [64.0] * 3).eval()
    model = WeakGraphModel(segmenter, cfg).eval()
    x = torch.rand(1, params.model.in_channels, args.size, args.size) * 255
    times: dict[str, list[float]] = {"forward": [], "superpixels": [], "graph": [], "gcn": []}
    with torch.no_grad():
        features = model.pixel_features(x)[0][0]
        for i in range(args.repeats + 1):  # the first round warms up and is dropped
            _, t_fwd = timed(segmenter, x)
            labels, t_sp = timed(superpixels, features, cfg.n_superpixels, cfg.compactness, cfg.kmeans_iters)
            (vertex_x, adj), t_graph = timed(graph_of, features, labels, cfg)
            _, t_gcn = timed(model.gcn, vertex_x, adj)
            if i:
                for key, value in zip(times, (t_fwd, t_sp, t_graph, t_gcn), strict=True):
                    times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    added = med["superpixels"] + med["graph"] + med["gcn"]
    print(f"{args.size}×{args.size}, U-Net {params.model.base_channels} ch depth {params.model.depth}, "
          f"{cfg.n_superpixels} superpixels ({int(labels.max()) + 1} kept), {cfg.kmeans_iters} k-means "
          f"iterations, 1 thread, median of {args.repeats}")
    print(f"  segmentation forward      {med['forward'] * 1e3:8.1f} ms   1.00×")
    for key in ("superpixels", "graph", "gcn"):
        print(f"  {key:<25} {med[key] * 1e3:8.1f} ms   {med[key] / med['forward']:.2f}×")
    print(f"  graph building + GCN      {added * 1e3:8.1f} ms   {added / med['forward']:.2f}× one forward pass")


if __name__ == "__main__":
    main()
