"""Serving throughput against calling the same registered model in-process, measured in one run
(this machine is noisy: compare the ratios, not the numbers).

A model of the default architecture (params.yaml ``model``, input ``train.image_size``; untrained:
throughput does not depend on the weights) is registered in a temporary SQLite store and served by
the real ``lesionflow serve`` process. Each request is a 256×256 RGB PNG answered with a PNG mask.

- in-process: ``registry.load_pyfunc`` + the server's per-request work without HTTP — decode the
  PNG, ``segment``, encode the mask PNG — called from a worker thread, as the server calls it
  (the ratios are against this row), and from the main thread: there torch's 2-thread OpenMP team
  collapses when the cores are oversubscribed (other jobs on this shared machine), a worker
  thread's does not;
- 1 client: sequential ``POST /predict`` on one keep-alive connection;
- 8 clients: eight threads, each with its own connection, sending at once.

Rounds are interleaved (in-process, 1 client, 8 clients, in-process, …) so all modes see the same
machine load; the median round is reported.

    python bench/serving_bench.py [--requests 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow import config, lineage, registry, tracking
from lesionflow.models import build_model, runtime
from lesionflow.models.pyfunc import decode_image, encode_png
from lesionflow.models.segmenter import Segmenter
from tests.conftest import free_port, wait_http

NAME = "bench-serving"
SIDE = 256


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def register(params: config.Params, int8_calibration: list[np.ndarray] | None = None) -> None:
    """Register an untrained model of ``params`` as champion; with ``int8_calibration`` frames, its
    int8 graph calibrated on them (what the evaluate step keeps when validation allows)."""
    tracking.connect(params)
    # eval mode, as a trained model reaches registration: the export folds batch norm in
    model = Segmenter(build_model(params.model), params.train.image_size, [128.0] * 3, [64.0] * 3,
                      params.model.tta).eval()
    tags = {lineage.TAG_DATASET_MD5: "bench", lineage.TAG_PARAMS_HASH: params.digest(),
            lineage.TAG_PIPELINE_RUN_ID: "bench"}
    with mlflow.start_run(), tempfile.TemporaryDirectory(prefix="lesionflow-bench-onnx-") as tmp:
        onnx_dir = None
        if int8_calibration is not None:
            onnx_dir = Path(tmp) / runtime.ONNX
            runtime.save(model, onnx_dir)
            graph = onnx_dir / runtime.SINGLE
            graph.write_bytes(runtime.quantize_int8(graph.read_bytes(),
                                                    np.stack([model.prepare(f) for f in int8_calibration])))
        version = registry.register_model(model, name=NAME, lineage=tags, metrics={}, onnx_dir=onnx_dir)
    registry.move_alias(NAME, "champion", version, why="bench", action="set")


def in_process(model, bodies: list[bytes]) -> float:
    start = time.perf_counter()
    for body in bodies:
        encode_png(model.segment(decode_image(body)).mask)
    return len(bodies) / (time.perf_counter() - start)


def post_all(url: str, bodies: list[bytes]) -> None:
    with requests.Session() as session:
        for body in bodies:
            answer = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=120)
            answer.raise_for_status()


def clients(url: str, bodies: list[bytes], n: int) -> float:
    shares = [bodies[i::n] for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda share: post_all(url, share), shares))
    return len(bodies) / (time.perf_counter() - start)


@contextmanager
def lesionflow_serve(overrides: list[str], log_dir: str, cwd: Path | str = REPO,
                     env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``lesionflow serve`` process on a free loopback port, ready (``/ping``) when this
    yields its base URL and process; its whole process group is stopped on exit."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "lesionflow"), "serve", "--host", "127.0.0.1",
           "--port", str(port), *[a for o in overrides for a in ("--set", o)]]
    with open(Path(log_dir) / "serve.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ping", timeout=120, proc=server)
        yield base, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lesionflow-serving-bench-") as tmp:
        overrides = [f"runtime.workdir={tmp}", f"runtime.model_name={NAME}"]
        params = config.load(REPO / "params.yaml", overrides)
        register(params)
        model = registry.load_pyfunc(NAME, "champion")
        bodies = images(args.requests)

        with lesionflow_serve(overrides, tmp) as (base, _):
            url = f"{base}/predict"
            post_all(url, bodies[:4])  # warm-up of both sides
            in_process(model, bodies[:4])
            rates: dict[str, list[float]] = {"in-process": [], "in-process, main thread": [],
                                             "1 client": [], "8 clients": []}
            for _ in range(args.rounds):
                with ThreadPoolExecutor(1) as worker:
                    rates["in-process"].append(worker.submit(in_process, model, bodies).result())
                rates["in-process, main thread"].append(in_process(model, bodies))
                rates["1 client"].append(clients(url, bodies, 1))
                rates["8 clients"].append(clients(url, bodies, 8))

    median = {k: float(np.median(v)) for k, v in rates.items()}
    base = median["in-process"]
    print(f"serving throughput, {SIDE}x{SIDE} PNG in, PNG mask out; model {params.model.base_channels}ch "
          f"depth {params.model.depth} at {params.train.image_size}px; {args.requests} requests x "
          f"{args.rounds} rounds (median); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for mode, rate in median.items():
        print(f"  {mode:<24} {rate:7.1f} req/s   {rate / base:5.2f} x in-process")


if __name__ == "__main__":
    main()
