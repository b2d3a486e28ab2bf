"""Serving under load: a bounded local soak of the real ``lesionflow serve`` process.

Two versions of the default architecture (params.yaml ``model``, untrained: latency does not
depend on the weights) are registered in a temporary SQLite store, ``champion`` on v1. The server
listens on 127.0.0.1 only (a free port) with the params.yaml ``serve`` limits and no alias
following, so only the reload at the midpoint moves it: there the soak points ``champion`` at v2
and calls ``POST /reload`` with the bearer token it gave the server.

``--clients`` threads (16), each on its own keep-alive connection, send 256×256 RGB PNGs for
``--seconds`` (60) and ask for PNG masks; a busy 503 is honoured as a client should (wait
``Retry-After``, then send again). Then everything stops by itself and the soak prints requests,
throughput, answers by status, latency percentiles, the reload, and the server's RSS (psutil, or
/proc/<pid>/status) at the start, before the reload, its peak and at the end.

It exits non-zero when anything failed: an answer other than 200 or a busy 503 (any other 5xx
above all), a request that got no HTTP answer, a failed reload, or a request sent after the
reload returned that was answered by the old version.

    python bench/serving_soak.py [--seconds 60] [--clients 16] [--set serve.max_queue=4 ...]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving_bench import SIDE, lesionflow_serve
from bench.serving_bench import images as png_images
from lesionflow import config, lineage, registry, tracking
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter
from lesionflow.serving import RELOAD_TOKEN_ENV

NAME = "bench-soak"


@dataclass(frozen=True)
class Outcome:
    sent: float  # monotonic seconds
    latency: float
    status: int | None  # None: no HTTP answer (connection refused or reset, timeout)
    version: str | None
    error: str | None = None


def register_two(params: config.Params) -> None:
    """v1 (champion) and v2, differently initialised, so the reload really swaps weights."""
    tracking.connect(params)
    tags = {lineage.TAG_DATASET_MD5: "soak", lineage.TAG_PARAMS_HASH: params.digest(),
            lineage.TAG_PIPELINE_RUN_ID: "soak"}
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = Segmenter(build_model(params.model), params.train.image_size, [128.0] * 3, [64.0] * 3)
        with mlflow.start_run():
            registry.register_model(model, name=NAME, lineage=tags, metrics={})
    registry.move_alias(NAME, "champion", "1", why="soak", action="set")


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    return psutil.Process(pid).memory_info().rss


def client(url: str, images: list[bytes], until: float) -> list[Outcome]:
    """Closed loop until ``until``: one request at a time; a busy 503 waits its Retry-After."""
    outcomes = []
    with requests.Session() as session:
        i = 0
        while (sent := time.monotonic()) < until:
            try:
                answer = session.post(url, data=images[i % len(images)], timeout=60,
                                      headers={"Content-Type": "image/png"})
            except requests.RequestException as err:
                outcomes.append(Outcome(sent, time.monotonic() - sent, None, None, type(err).__name__))
                continue
            latency = time.monotonic() - sent
            version = answer.json().get("version") if answer.status_code == 200 else None
            outcomes.append(Outcome(sent, latency, answer.status_code, version))
            i += 1
            if answer.status_code == 503:
                time.sleep(max(0.0, min(float(answer.headers.get("Retry-After", 1)), until - time.monotonic())))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for the server (e.g. serve.max_queue=4); repeatable")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lesionflow-serving-soak-") as tmp:
        overrides = [f"runtime.workdir={tmp}", f"runtime.model_name={NAME}", "serve.follow_seconds=null",
                     *args.set]
        params = config.load(REPO / "params.yaml", overrides)
        register_two(params)
        images = png_images(8)
        token = secrets.token_hex(16)

        rss: list[int] = []
        stop_sampling = threading.Event()
        with lesionflow_serve(overrides, tmp, env={**os.environ, RELOAD_TOKEN_ENV: token}) as (base, server):
            try:
                rss.append(rss_bytes(server.pid))  # loaded and warmed up, before any request

                def sample() -> None:
                    while not stop_sampling.wait(1.0):
                        rss.append(rss_bytes(server.pid))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                start = time.monotonic()
                until = start + args.seconds
                with ThreadPoolExecutor(args.clients) as pool:
                    runs = [pool.submit(client, f"{base}/predict", images, until) for _ in range(args.clients)]
                    time.sleep(args.seconds / 2)
                    before_reload = rss_bytes(server.pid)
                    registry.move_alias(NAME, "champion", "2", why="soak reload", action="set")
                    asked = time.monotonic()
                    reload = requests.post(f"{base}/reload", headers={"Authorization": f"Bearer {token}"},
                                           timeout=120)
                    reloaded = time.monotonic()
                    outcomes = [o for run in runs for o in run.result()]
                elapsed = time.monotonic() - start
                stop_sampling.set()
                sampler.join()
                rss.append(rss_bytes(server.pid))
            finally:
                stop_sampling.set()  # the sampler must not outlive the server

    statuses = Counter(o.status for o in outcomes)
    errors = Counter(o.error for o in outcomes if o.error)
    ok = np.array([o.latency for o in outcomes if o.status == 200]) * 1000
    busy = np.array([o.latency for o in outcomes if o.status == 503]) * 1000
    versions = Counter((o.version, "after" if o.sent >= reloaded else "during" if o.sent >= asked else "before")
                       for o in outcomes if o.status == 200)
    stale = versions[("1", "after")]
    unexpected = sum(n for status, n in statuses.items() if status not in (200, 503))
    mib = [r / 2**20 for r in rss]
    cfg = params.serve

    print(f"serving soak: {args.clients} clients x {elapsed:.1f} s on 127.0.0.1, {SIDE}x{SIDE} PNG in, PNG "
          f"mask out; model {params.model.base_channels}ch depth {params.model.depth} at "
          f"{params.train.image_size}px; serve.inference_workers {cfg.inference_workers}, max_queue "
          f"{cfg.max_queue}, retry_after {cfg.retry_after_seconds} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  requests        {len(outcomes)} ({len(outcomes) / elapsed:.1f}/s), answered 200: "
          f"{statuses[200]} ({statuses[200] / elapsed:.1f}/s)")
    print(f"  by status       {', '.join(f'{s}: {n}' for s, n in sorted(statuses.items(), key=str))}")
    print(f"  busy 503        {statuses[503]} ({statuses[503] / max(len(outcomes), 1):.1%} of requests), "
          f"answered in p50 {np.percentile(busy, 50) if busy.size else 0:.1f} ms")
    print(f"  errors          {unexpected + sum(errors.values())} (other statuses: {unexpected}; "
          f"no HTTP answer: {dict(errors) or 0})")
    print(f"  latency of 200  p50 {np.percentile(ok, 50):.0f} ms, p99 {np.percentile(ok, 99):.0f} ms, "
          f"max {ok.max():.0f} ms")
    print(f"  reload at {asked - start:.1f} s  {reload.status_code} in {reloaded - asked:.2f} s "
          f"(v{reload.json().get('previous_version')} → v{reload.json().get('version')}); answers by "
          f"version and when sent: " + ", ".join(f"v{v} {when}: {n}" for (v, when), n in sorted(versions.items())))
    print(f"  stale after     {stale} (sent after the reload returned, answered by v1)")
    print(f"  server RSS      start {mib[0]:.0f} MiB, before the reload {before_reload / 2**20:.0f} MiB, "
          f"peak {max(mib):.0f} MiB, end {mib[-1]:.0f} MiB ({mib[-1] - mib[0]:+.0f} MiB)")
    failed = unexpected or errors or reload.status_code != 200 or stale
    print("  verdict         " + ("FAILED" if failed else "ok: no 5xx other than 503, no lost request"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
