"""Data-parallel training throughput: 1 vs 2 local worker processes (torchrun, gloo, 1 thread each).

Setting: ``params.yaml`` + ``configs/kvasir-seg.yaml`` (the Kvasir model and ``train.image_size``,
``train.batch_size`` per rank, as ``python -m lesionflow.distributed`` trains), on a synthetic
dataset of 256² samples ingested with ``build_dataset`` (``ingest.source: synthetic``), augmentation
as configured. Each arm is a real ``torchrun`` job running ``training.fit`` on every labelled record
(``DistributedSampler`` halves with 2 ranks, gradients averaged by the shared ``TrainingLoop``).
Throughput = samples of an epoch, all ranks together, over that epoch's wall time (rank 0's clock,
validation on one image included); the first epoch is warm-up and not counted. Arms alternate
(1, 2, 1, 2, ...) in one run, so load from other processes hits both alike.

On a machine with 2 cores the ideal ratio is 2; the all-reduce of the gradients and anything else
running on the machine take their share.

    python bench/ddp_bench.py [--images 64] [--epochs 3] [--repeats 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lesionflow import config, distributed

REPO = Path(__file__).resolve().parents[1]


def bench_params(images: int, epochs: int, work: Path) -> config.Params:
    return config.load([REPO / "params.yaml", REPO / "configs" / "kvasir-seg.yaml"],
                       ["ingest.source=synthetic", f"synthetic.n_images={images}", "synthetic.n_videos=0",
                        "synthetic.n_weak=0", "synthetic.size=256", f"runtime.workdir={work / 'work'}",
                        f"train.epochs={epochs}", "train.max_minutes=null", "train.device=cpu"])


def worker(images: int, epochs: int, work: Path, out: Path) -> None:
    """One rank: fit on the bench dataset; rank 0 writes the per-epoch samples/s to ``out``."""
    from lesionflow.data.manifest import read_manifest
    from lesionflow.steps.train import new_segmenter
    from lesionflow.training import SegmentationDataset, fit, labelled, seed_everything

    torch.set_num_threads(1)
    params = bench_params(images, epochs, work)
    dataset = work / "dataset"
    records = [r for split in ("train", "val", "test") for r in labelled(read_manifest(dataset), split)]
    with distributed.process_group(torch.device("cpu")):
        seed_everything(params.seed, params.train.deterministic)
        model = new_segmenter(params, dataset)
        train = SegmentationDataset(dataset, records, model, augment=params.train.augment, seed=params.seed)
        val = SegmentationDataset(dataset, records[:1], model)
        rows = []
        fit(model, train, val, params.train, seed=params.seed, on_epoch=rows.append)
        world, batch = distributed.world_size(), params.train.batch_size
        per_epoch = -(-len(train) // world) // batch * batch * world  # each rank drops its last
        seconds = [b["seconds"] - a["seconds"] for a, b in zip(rows, rows[1:])]
        if distributed.is_main():
            out.write_text(json.dumps({"world": world, "batch_per_rank": batch, "samples_per_epoch": per_epoch,
                                       "samples_per_s": [per_epoch / s for s in seconds]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(nproc: int, images: int, epochs: int, work: Path) -> dict:
    out = work / f"arm{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, "--worker",
           "--images", str(images), "--epochs", str(epochs), "--work", str(work), "--out", str(out)]
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                   check=True, timeout=3600, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic 256² labelled stills")
    parser.add_argument("--epochs", type=int, default=3, help="per arm; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="alternations of the two arms")
    parser.add_argument("--work", type=Path, help="dataset folder (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.images, args.epochs, args.work, args.out)
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not (work / "dataset").is_dir():
            from lesionflow.steps.ingest import build_dataset

            build_dataset(bench_params(args.images, args.epochs, work), work / "dataset")
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for nproc in (1, 2):
                arm = run_arm(nproc, args.images, args.epochs, work)
                rates[nproc] += arm["samples_per_s"]
                print(f"{nproc} worker(s) × batch {arm['batch_per_rank']}: "
                      f"{', '.join(f'{r:.2f}' for r in arm['samples_per_s'])} samples/s "
                      f"({arm['samples_per_epoch']} samples an epoch)", flush=True)
    mean = {n: sum(r) / len(r) for n, r in rates.items()}
    print(f"\ntraining samples/s: 1 worker {mean[1]:.2f}, 2 workers {mean[2]:.2f}, "
          f"ratio {mean[2] / mean[1]:.2f} (ideal 2 on 2 cores); machine load average "
          f"{os.getloadavg()[1]:.1f} over the last 5 min on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
