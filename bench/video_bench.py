"""Rollout speed of the next-frame model G at 256×256 against 30 frames/s real time.

A rollout feeds G its own outputs one frame at a time (as synthesis from a still does), so each
generated frame is one forward pass at batch 1. Measured side by side in interleaved rounds under
the same machine load: the ``params.yaml`` architecture and the other one (shared encoder vs
separate networks), mask propagation (real frames in, masks only out), and as a yardstick the
default segmentation U-Net (``params.yaml`` ``model``) on the same frames. Untrained weights:
speed does not depend on them. Compare the ratios, not the seconds.

    python bench/video_bench.py [--frames 30] [--rounds 3] [--set video.base_channels=16 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config
from lesionflow.models import build_model
from lesionflow.video.model import NextFrameModel
from lesionflow.video.synthesis import propagate_masks, rollout

REAL_TIME_FPS = 30.0
SIZE = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=30, help="frames generated per rollout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    params = config.load(REPO / "params.yaml", args.overrides)
    cfg = params.video
    segmenter = build_model(params.model).eval()
    other = "separate" if cfg.architecture == "shared" else "shared"
    models = {arch: NextFrameModel(arch, cfg.base_channels, cfg.depth).eval()
              for arch in (cfg.architecture, other)}
    image, mask = torch.rand(1, 3, SIZE, SIZE), (torch.rand(1, 1, SIZE, SIZE) > 0.5).float()
    frames = np.random.default_rng(0).random((args.frames + 1, 3, SIZE, SIZE), dtype=np.float32)
    timings: dict[str, list[float]] = {f"rollout, {a}": [] for a in models}
    timings[f"propagation, {cfg.architecture}"] = []
    timings["segmenter U-Net"] = []
    for model in models.values():
        rollout(model, image, mask, 1)  # warm-up: first calls allocate
    for _ in range(args.rounds):
        for arch, model in models.items():
            start = time.perf_counter()
            rollout(model, image, mask, args.frames)
            timings[f"rollout, {arch}"].append(args.frames / (time.perf_counter() - start))
        start = time.perf_counter()
        propagate_masks(models[cfg.architecture], frames, mask[0].numpy(), key=0)
        timings[f"propagation, {cfg.architecture}"].append(args.frames / (time.perf_counter() - start))
        start = time.perf_counter()
        with torch.no_grad():
            for t in range(args.frames):
                segmenter(torch.from_numpy(frames[t:t + 1]))
        timings["segmenter U-Net"].append(args.frames / (time.perf_counter() - start))
    print(f"next-frame model G, {cfg.base_channels} ch, depth {cfg.depth}, {SIZE}×{SIZE}, batch 1, "
          f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}; "
          f"median of {args.rounds} interleaved rounds of {args.frames} frames")
    unet = float(np.median(timings["segmenter U-Net"]))
    for name, fps in timings.items():
        value = float(np.median(fps))
        print(f"  {name:<24} {value:7.1f} frames/s = {value / REAL_TIME_FPS:.3f}× real time (30 fps), "
              f"{value / unet:.2f}× the segmenter's speed")


if __name__ == "__main__":
    main()
