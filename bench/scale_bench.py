"""Files vs shards at scale, measured in one run against a moto S3 server this bench starts.

For ``--samples`` synthetic 256×256 RGB images with masks (default 10,000):

1. ingest: source folder → canonical dataset (files layout), then files → shards (``write_shards``);
2. DVC: ``dvc add``, ``dvc push`` (timed apart, the same commands and workspace settings as
   ``lesionflow.versioning``), objects on the remote, ``dvc pull`` into a fresh workspace (as
   ``restore_dataset`` does), and for shards the unpacking back to files;
3. streaming: ``ShardStream`` samples/s over the train split straight from S3 (``RemoteShards``)
   with 2 DataLoader workers (decode, resize; no model), against the same from local shards.

The machine is shared and noisy: read the ratios. Numbers feed docs/scaling.md.

    nice -n 10 python bench/scale_bench.py [--samples 10000] [--shard-mb 256] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesionflow.config import IngestConfig, MetadataColumns
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import link_or_copy, read_manifest
from lesionflow.data.shards import (
    LocalShards,
    RemoteShards,
    ShardStream,
    unshard,
    write_shards,
)
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.training import labelled
from lesionflow.versioning import (  # the exact commands versioning runs
    _dvc,
    _init_workspace,
)

SIZE = 256
BUCKET = "scale-bench"


def make_source(root: Path, n: int, seed: int = 0) -> None:
    """n stills with one lesion each: a smooth background, a tinted irregular blob, sensor noise
    (so the PNGs ingest writes compress like photographs do, not like flat colour). Written as
    BMP: the source is the user's data, not part of what is timed, and BMP costs no encoding."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    noise_rng = np.random.default_rng(seed)
    noise = [noise_rng.normal(0, 6, (SIZE, SIZE, 3)).astype(np.float32) for _ in range(8)]

    def one(i: int) -> tuple[str, str, str]:
        rng = np.random.default_rng((seed, i))
        coarse = rng.uniform(60, 200, (6, 6, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
        cy, cx = rng.uniform(0.3, 0.7, 2) * SIZE
        ry, rx = rng.uniform(0.08, 0.25, 2) * SIZE
        dy, dx = (yy - cy) / ry, (xx - cx) / rx
        mask = dy**2 + dx**2 <= (1 + 0.1 * np.cos(3 * dx + rng.uniform(0, 6.3))) ** 2
        image[mask] = 0.4 * image[mask] + 0.6 * rng.uniform(40, 160, 3)
        image += np.roll(noise[i % len(noise)], int(rng.integers(SIZE)), axis=int(rng.integers(2)))
        record_id = f"case_{i:06d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{record_id}.bmp")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{record_id}.bmp")
        return record_id, ("round", "elongated")[i % 2], f"patient_{i // 4:06d}"

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        rows = list(pool.map(one, range(n)))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "lesion_type", "group"])
        writer.writerows(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """``moto_server`` in its own process (its CPU is not the bench's) and process group."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto_server did not start (see {log})") from None
            time.sleep(0.3)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def count_objects(s3, prefix: str) -> tuple[int, int]:
    n = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        n += page.get("KeyCount", 0)
        size += sum(o["Size"] for o in page.get("Contents", []))
    return n, size


def dvc_round_trip(dataset: Path, ws: Path, url: str, endpoint: str) -> dict:
    """add, push (into ``ws``) and pull (into a fresh workspace), each timed on its own."""
    ws.mkdir()
    _init_workspace(ws, url, endpoint, cache_type="reflink,copy")
    shutil.copytree(dataset, ws / "data", copy_function=link_or_copy)
    _, add = timed(_dvc, ["add", "--no-relink", "data"], ws)
    _, push = timed(_dvc, ["push", "data.dvc"], ws)
    fresh = ws.parent / f"{ws.name}-pull"
    fresh.mkdir()
    _init_workspace(fresh, url, endpoint, cache_type="hardlink,copy")
    shutil.copy(ws / "data.dvc", fresh / "data.dvc")
    _, pull = timed(_dvc, ["pull", "data.dvc"], fresh)
    md5 = next(line.split()[-1] for line in (ws / "data.dvc").read_text().splitlines() if "md5:" in line)
    return {"add": add, "push": push, "pull": pull, "md5": md5, "pulled": fresh / "data"}


def stream_rate(source, records, model, workers: int = 2, batch: int = 32) -> float:
    stream = ShardStream(source, records, model, shuffle_buffer=256, batch_size=batch, num_workers=workers)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers)
    start, n = time.perf_counter(), 0
    for image, _, _ in loader:
        n += len(image)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--shard-mb", type=float, default=256)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "DVC_NO_ANALYTICS": "1"})
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="scale-bench-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    moto, endpoint = start_moto(work / "moto.log")
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        print(f"{args.samples} samples of {SIZE}x{SIZE}, shards of {args.shard_mb:g} MiB, S3: moto {endpoint}")
        _, t_source = timed(make_source, work / "source", args.samples)
        print(f"source written in {t_source:.1f}s (not counted)")
        cfg = IngestConfig(source=str(work / "source"), metadata_csv="metadata.csv",
                           columns=MetadataColumns(frame=None, key_frame=None, area_ratio=None,
                                                   area_error=None))
        _, t_ingest = timed(ingest, cfg, work / "files")
        index, t_shard = timed(write_shards, work / "files", work / "shards", args.shard_mb)
        rows = {}
        for layout in ("files", "shards"):
            url = f"s3://{BUCKET}/{layout}"
            rows[layout] = dvc_round_trip(work / layout, work / f"ws-{layout}", url, endpoint)
            rows[layout]["objects"], rows[layout]["bytes"] = count_objects(s3, layout)
            print(f"{layout}: add {rows[layout]['add']:.1f}s, push {rows[layout]['push']:.1f}s, "
                  f"pull {rows[layout]['pull']:.1f}s, {rows[layout]['objects']} objects", flush=True)
        _, t_unshard = timed(unshard, rows["shards"]["pulled"], work / "unsharded")

        model = Segmenter(UNet(3, 16, 4), SIZE, [0.0] * 3, [1.0] * 3)
        train = labelled(read_manifest(work / "files"), "train")
        remote = RemoteShards(rows["shards"]["md5"], remote=f"s3://{BUCKET}/shards", endpoint_url=endpoint)
        s3_rate = stream_rate(remote, train, model)
        local_rate = stream_rate(LocalShards(work / "shards"), train, model)
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=30)

    files, shards = rows["files"], rows["shards"]
    mib = sum(s.bytes for s in index) / 2**20
    print()
    print(f"{'':34}{'files':>12}{'shards':>12}{'files/shards':>14}")

    def row(name: str, a: float, b: float, fmt: str = "{:.1f}") -> None:
        print(f"{name:34}{fmt.format(a):>12}{fmt.format(b):>12}{a / b:>13.1f}x")

    row("ingest (s)", t_ingest, t_ingest + t_shard)
    row("dvc add (s)", files["add"], shards["add"])
    row("dvc push (s)", files["push"], shards["push"])
    row("objects on the remote", files["objects"], shards["objects"], "{:.0f}")
    row("MiB on the remote", files["bytes"] / 2**20, shards["bytes"] / 2**20)
    row("dvc pull (s)", files["pull"], shards["pull"])
    row("push + pull (s)", files["push"] + files["pull"], shards["push"] + shards["pull"])
    print(f"\nshards: {len(index)} tars, {mib:.0f} MiB, {args.samples / len(index):.0f} samples each; "
          f"write_shards {t_shard:.1f}s, unshard after pull {t_unshard:.1f}s")
    print(f"per object: push {1000 * files['push'] / files['objects']:.1f} ms (files), pull "
          f"{1000 * files['pull'] / files['objects']:.1f} ms (files); per MiB: push "
          f"{1000 * shards['push'] / mib:.0f} ms, pull {1000 * shards['pull'] / mib:.0f} ms (shards)")
    print(f"streaming the train split ({len(train)} samples, 2 workers, decode + resize, no model): "
          f"from S3 {s3_rate:.0f} samples/s, from local shards {local_rate:.0f} samples/s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
