"""Meta-training cost: one first-order and one second-order outer step against one plain supervised
step (forward + backward + Adam step), on the default model (params.yaml ``model``).

"Same batch size" here means the same number of images per step: the plain step sees ``--batch``
images; an outer step splits them into a support half (inner loop) and a query half (outer loss).
So first-order costs about what plain training costs per image seen; with support and query each
as large as the plain batch it would be ~2× by construction. Variants run interleaved (plain,
first, second, plain, ...) so machine noise hits all three alike; medians and ratios are printed.

    python bench/meta_bench.py [--size 96] [--batch 8] [--repeats 5]
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
from lesionflow.meta import Batch, default_loss, meta_step
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter

TARGETS = {"first": 1.5, "second": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="image side (default: train.image_size)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (support + query)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    params = config.load(REPO / "params.yaml")
    size = args.size or params.train.image_size
    torch.manual_seed(0)
    model = Segmenter(build_model(params.model), size, [128.0] * 3, [64.0] * 3).train()
    c = params.model.in_channels
    x = torch.rand(args.batch, c, size, size) * 255
    y = (torch.rand(args.batch, 1, size, size) > 0.8).float()
    w = torch.ones(args.batch)
    half = args.batch // 2
    support, query = Batch(x[:half], y[:half], w[:half]), Batch(x[half:], y[half:], w[half:])
    plain_opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def plain() -> None:
        loss = default_loss(model(x), y, w)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def outer(order: str):
        return lambda: meta_step(model, meta_opt, support, query, inner_lr=0.01, order=order)

    steps = {"plain": plain, "first": outer("first"), "second": outer("second")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.repeats + 1):  # round 0 warms up allocators and kernels
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: UNet{params.model.model_dump()}  input {args.batch}×{c}×{size}×{size}  "
          f"threads {torch.get_num_threads()}  repeats {args.repeats} (interleaved, after 1 warm-up)")
    print(f"same batch size = {args.batch} images per step: plain {args.batch}; "
          f"outer step support {half} + query {args.batch - half}")
    print(f"{'step':<22}{'median s':>10}{'ratio':>8}{'target':>9}")
    print(f"{'plain supervised':<22}{med['plain']:>10.3f}{1.0:>8.2f}")
    for order in ("first", "second"):
        ratio = med[order] / med["plain"]
        verdict = "ok" if ratio <= TARGETS[order] else "MISSED"
        print(f"{order + '-order outer':<22}{med[order]:>10.3f}{ratio:>8.2f}"
              f"{'≤ ' + format(TARGETS[order], '.1f') + '×':>9}  {verdict}")


if __name__ == "__main__":
    main()
