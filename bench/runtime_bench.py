"""Inference runtimes side by side: torch against ONNX Runtime per frame, on the main thread and on
a worker thread, and the served throughput with 8 clients, all measured in one run (this machine
is shared and noisy: compare the ratios, not the numbers).

A model of the default architecture (``Params()`` ``model``, input ``train.image_size``, any
``--set`` applied; untrained: speed does not depend on the weights) is registered — exported to
ONNX as every registration does — in a temporary SQLite store and loaded back as the pyfunc serves
it. Frames are 256×256 RGB uint8, batch 1:

- end to end, decode-free: uint8 frame → ``segment`` (resize to the model's input, the network,
  resize back, threshold, confidence) → mask, with the version's torch module and with its ONNX
  Runtime twin, each on a worker thread (as the server runs it) and on the main thread (where
  torch's OpenMP team collapses when the cores are oversubscribed; the evaluate step runs there);
- in-process, as served: the server's per-request work without HTTP (decode a PNG, ``segment``
  through the served runtime, encode the mask PNG) on a worker thread — what the served rows are
  compared with (``bench/serving_bench.py``'s measure);
- 8 clients: eight threads posting the PNGs at once to the real ``lesionflow serve`` process.

Rounds are interleaved so all modes see the same machine load; the median round is reported.
Each end-to-end row also gives the process's CPU time per frame, which other jobs on the machine
move far less than wall time (a runtime whose threads spin while waiting burns CPU without work).

With ``--int8`` the registered graph is the int8 twin (calibrated on the bench's frames): what the
evaluate step keeps when validation allows, so the served rows are those of an int8 version.

    python bench/runtime_bench.py [--frames 120] [--requests 48] [--rounds 3] [--set model.depth=3] [--int8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving_bench import (
    NAME,
    SIDE,
    clients,
    images,
    in_process,
    lesionflow_serve,
    post_all,
    register,
)
from lesionflow import config, registry
from lesionflow.models.pyfunc import SegmentationModel

TARGET_FPS, TARGET_SERVED = 60.0, 0.8  # issue 13: 2× real time in-process; served ≥ 0.8× that


def frames_per_second(model: SegmentationModel, frames: list[np.ndarray]) -> tuple[float, float]:
    """(frames/s, CPU ms per frame of this process, all its threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    for frame in frames:
        model.segment(frame)
    return len(frames) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(frames)


def on_worker(fn, *args):
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120, help="frames per end-to-end mode and round")
    parser.add_argument("--requests", type=int, default=48, help="requests per served mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, e.g. model.base_channels=8 (repeatable)")
    parser.add_argument("--int8", action="store_true", help="register and serve the int8 graph")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(args.frames)]
    bodies = images(args.requests)
    with tempfile.TemporaryDirectory(prefix="lesionflow-runtime-bench-") as tmp:
        overrides = [f"runtime.workdir={tmp}", f"runtime.model_name={NAME}", *args.set]
        params = config.load(None, overrides)
        register(params, frames[:16] if args.int8 else None)
        served = registry.load_pyfunc(NAME, "champion")
        assert served.runtime_name == "onnxruntime", "onnxruntime is not installed"
        models = {"torch": SegmentationModel.wrap(served.model, served.threshold), "onnxruntime": served}

        rates: dict[str, list] = {}
        with lesionflow_serve(overrides, tmp, cwd=tmp) as (base, _):
            url = f"{base}/predict"
            post_all(url, bodies[:4])  # warm-up of every side
            for model in models.values():
                frames_per_second(model, frames[:4])
            for _ in range(args.rounds):
                for name, model in models.items():
                    rates.setdefault(f"{name}, worker thread", []).append(
                        on_worker(frames_per_second, model, frames))
                    rates.setdefault(f"{name}, main thread", []).append(frames_per_second(model, frames))
                rates.setdefault("in-process PNG, worker", []).append(on_worker(in_process, served, bodies))
                rates.setdefault("served, 8 clients", []).append(clients(url, bodies, 8))

    fps = {k: np.median(v, axis=0) for k, v in rates.items()}  # per column: (frames/s, CPU ms)
    m = params.model
    print(f"inference runtimes, {SIDE}x{SIDE} RGB frames, batch 1; model {m.base_channels}ch depth {m.depth} "
          f"at {params.train.image_size}px, ONNX graph {'int8' if args.int8 else 'float'}; {args.rounds} rounds (median); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("end to end, decode-free (uint8 frame -> mask):")
    for thread in ("worker thread", "main thread"):
        (t, t_cpu), (o, o_cpu) = fps[f"torch, {thread}"], fps[f"onnxruntime, {thread}"]
        print(f"  {thread:<14} torch {t:6.1f} frames/s ({t_cpu:5.1f} CPU ms/frame)   onnxruntime {o:6.1f} "
              f"frames/s ({o_cpu:5.1f} CPU ms/frame)   {o / t:5.2f} x torch   "
              f"{'meets' if o >= TARGET_FPS else 'misses'} {TARGET_FPS:.0f} frames/s")
    base = fps["in-process PNG, worker"]
    print(f"served (onnxruntime; PNG in, PNG mask out), {args.requests} requests per round:")
    print(f"  in-process, worker     {base:7.1f} req/s")
    print(f"  8 clients              {fps['served, 8 clients']:7.1f} req/s   "
          f"{fps['served, 8 clients'] / base:5.2f} x in-process (target {TARGET_SERVED})   "
          f"{fps['served, 8 clients'] / fps['onnxruntime, worker thread'][0]:5.2f} x decode-free")


if __name__ == "__main__":
    main()
