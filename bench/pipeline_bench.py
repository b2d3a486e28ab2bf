"""Spine benchmarks, measured in one run (this machine is noisy: compare the ratios, not seconds).

1. Inference speed of the default model (params.yaml ``model``) on 256×256 frames, one frame at a
   time as a video stream arrives: network only, and end to end (resize + normalise + sigmoid +
   resize back), each as a ratio to 30 frames/s real time.
2. Orchestration overhead of the local pipeline: wall time of ``lesionflow run`` (kfp.local,
   one subprocess per step) against the sum of the steps' own compute time, read from the
   steps' MLflow runs (start → end of each step body).

    python bench/pipeline_bench.py [--frames 60] [--set train.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config, lineage, tracking
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter
from lesionflow.pipeline_runs import run_local

REAL_TIME_FPS = 30.0


def inference_fps(params: config.Params, frames: int, rounds: int = 3) -> tuple[float, float]:
    """Median frames/s over ``rounds`` interleaved rounds (network, end to end, network, …), so
    both are measured under the same machine load."""
    model = Segmenter(build_model(params.model), 256, [128.0] * 3, [64.0] * 3).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(frames)]
    # built exactly as predict_proba builds its input, so the two differ only by pre/post-processing
    tensors = [torch.from_numpy(np.stack([model.prepare(im)])).float() for im in images]
    network, end_to_end = [], []
    with torch.no_grad():
        model(tensors[0])  # warm-up: first call allocates
        for _ in range(rounds):
            start = time.perf_counter()
            for x in tensors:
                model(x)
            network.append(frames / (time.perf_counter() - start))
            start = time.perf_counter()
            for im in images:
                model.predict_proba([im])
            end_to_end.append(frames / (time.perf_counter() - start))
    return float(np.median(network)), float(np.median(end_to_end))


def pipeline_overhead(params: config.Params) -> tuple[float, float, dict[str, float]]:
    start = time.perf_counter()
    summary = run_local(params)
    wall = time.perf_counter() - start
    from mlflow import MlflowClient

    experiment_id = tracking.connect(params)  # before the client: it binds the tracking URI
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{lineage.TAG_PIPELINE_RUN_ID}` = '{summary['pipeline_run_id']}'")
    steps = {r.data.tags[lineage.TAG_STEP]: (r.info.end_time - r.info.start_time) / 1000
             for r in sorted(runs, key=lambda r: r.info.start_time)
             if r.data.tags.get(lineage.TAG_STEP) != "pipeline"}
    return wall, sum(steps.values()), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    params = config.load(REPO / "params.yaml", args.set)
    network, end_to_end = inference_fps(params, args.frames)
    print(f"inference, default model ({params.model.base_channels} ch, depth {params.model.depth}) "
          f"at 256x256, batch 1, {torch.get_num_threads()} threads, median of 3 interleaved rounds:")
    print(f"  network only   {network:7.1f} frames/s = {network / REAL_TIME_FPS:5.2f}x real time (30 fps)")
    print(f"  end to end     {end_to_end:7.1f} frames/s = {end_to_end / REAL_TIME_FPS:5.2f}x real time (30 fps)")

    with tempfile.TemporaryDirectory(prefix="lesionflow-bench-") as tmp:
        run_params = config.load(REPO / "params.yaml", args.set + [f"runtime.workdir={tmp}"])
        wall, compute, steps = pipeline_overhead(run_params)
    print("local pipeline (kfp.local, default params unless --set):")
    for name, seconds in steps.items():
        print(f"  step {name:<13} {seconds:6.1f} s")
    print(f"  sum of steps       {compute:6.1f} s")
    print(f"  wall time          {wall:6.1f} s = {wall / compute:4.2f}x the steps' compute "
          f"(overhead {wall - compute:.1f} s: process start-up, imports, kfp.local bookkeeping)")


if __name__ == "__main__":
    main()
