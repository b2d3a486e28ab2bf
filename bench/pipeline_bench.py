"""Spine benchmarks, measured in one run (this machine is noisy: compare the ratios, not seconds).

1. Inference speed of the default model (params.yaml ``model``) on 256×256 frames, one frame at a
   time as a video stream arrives: network only, and end to end (resize + normalise + sigmoid +
   resize back), each as a ratio to 30 frames/s real time.
2. Orchestration overhead of the local pipeline: wall time of ``lesionflow run`` (the CLI in its
   own process, as a user runs it, in a fresh workdir; kfp.local runs one subprocess per step)
   against the sum of the steps' own compute time, read from the steps' MLflow runs (start → end
   of each step body), and where the rest went: a table of the phases every process of the run
   marked (``lesionflow.timing``: start-up, imports, MLflow connect, lease, DVC, exit, ...).

    python bench/pipeline_bench.py [--frames 60 (0: pipeline only)] [--set train.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config, lineage, timing, tracking
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter

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


def pipeline_overhead(sets: list[str], workdir: Path) -> tuple[float, float, dict[str, float], list[dict]]:
    """Wall time of ``lesionflow run``, the steps' compute (their MLflow runs), and the timing
    marks of its processes, bracketed by the CLI's launch and exit."""
    log = workdir / "timing.jsonl"
    cli = Path(sys.executable).with_name("lesionflow")
    command = [str(cli), "run", "--params", str(REPO / "params.yaml"),
               *(f"--set={s}" for s in [*sets, f"runtime.workdir={workdir}"])]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, timing.ENV: str(log)})
    end = time.time()
    from mlflow import MlflowClient

    params = config.load(REPO / "params.yaml", [*sets, f"runtime.workdir={workdir}"])
    experiment_id = tracking.connect(params)  # before the client: it binds the tracking URI
    runs = MlflowClient().search_runs(  # a fresh workdir: this run's steps only
        [experiment_id], filter_string=f"tags.`{lineage.TAG_STEP}` != 'pipeline'")
    steps = {r.data.tags[lineage.TAG_STEP]: (r.info.end_time - r.info.start_time) / 1000
             for r in sorted(runs, key=lambda r: r.info.start_time)}
    # file order is time order (the processes run one after another), bar each process's start
    marks = [json.loads(line) for line in log.read_text().splitlines()]
    marks = [{"step": "", "phase": "", "t": start}, *marks, {"step": "run", "phase": "exit", "t": end}]
    return end - start, sum(steps.values()), steps, marks


# The phases ``lesionflow run`` ("run") and its steps mark, in order; each runs from the previous mark.
PHASES = {
    "process start": "spawn; a step's also covers kfp.local set-up or the previous step's exit",
    "start-up": "python (+ kfp executor, component), until lesionflow.timing is imported",
    "imports": "what run_local / the step function imports (MLflow, torch, ...)",
    "mlflow connect": "tracking.connect: health wait, store (+ new database), experiment",
    "lease acquire": "the pipeline lease (run: only checked; steps: re-entrant ticket)",
    "run start": "parent run lookup + nested start_run",
    "compute": "step body",
    "dvc version": "DVC add + push of the step's dataset (inside its MLflow run)",
    "run end": "end of the nested MLflow run",
    "lease release": "lease check (+ release after register), heartbeat stop",
    "exit": "run: the last step's exit, kfp.local collecting outputs, summary, CLI exit",
}


def phase_table(marks: list[dict]) -> dict[str, dict[str, float]]:
    """Seconds per phase and step; all of them add up to the wall time exactly."""
    table = {phase: {} for phase in PHASES}
    for previous, mark in zip(marks, marks[1:]):
        row = table[mark["phase"]]
        row[mark["step"]] = row.get(mark["step"], 0.0) + mark["t"] - previous["t"]
    return table


def print_inference(params: config.Params, frames: int) -> None:
    network, end_to_end = inference_fps(params, frames)
    print(f"inference, default model ({params.model.base_channels} ch, depth {params.model.depth}) "
          f"at 256x256, batch 1, {torch.get_num_threads()} threads, median of 3 interleaved rounds:")
    print(f"  network only   {network:7.1f} frames/s = {network / REAL_TIME_FPS:5.2f}x real time (30 fps)")
    print(f"  end to end     {end_to_end:7.1f} frames/s = {end_to_end / REAL_TIME_FPS:5.2f}x real time (30 fps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    params = config.load(REPO / "params.yaml", args.set)
    if args.frames:
        print_inference(params, args.frames)
    with tempfile.TemporaryDirectory(prefix="lesionflow-bench-") as tmp:
        wall, compute, steps, marks = pipeline_overhead(args.set, Path(tmp))
    print("local pipeline (kfp.local, default params unless --set):")
    for name, seconds in steps.items():
        print(f"  step {name:<17} {seconds:6.1f} s")
    print(f"  sum of steps           {compute:6.1f} s")
    print(f"  wall time              {wall:6.1f} s = {wall / compute:4.2f}x the steps' compute "
          f"(overhead {wall - compute:.1f} s = {(wall - compute) / compute:.0%} of compute)")
    table = phase_table(marks)
    names = list(dict.fromkeys(m["step"] for m in marks[1:]))
    print("where the wall time went, s (lesionflow.timing marks of `lesionflow run` and its steps):")
    print(f"  {'phase':<15}" + "".join(f"{n[:10]:>11}" for n in names) + f"{'total':>9}")
    for phase, row in table.items():
        total = sum(row.values())
        print(f"  {phase:<15}" + "".join(f"{row.get(n, 0.0):11.1f}" for n in names)
              + f"{total:9.1f} {total / wall:4.0%}  {PHASES[phase]}")


if __name__ == "__main__":
    main()
