"""Training throughput at the Kvasir-SEG setting, before and after, measured side by side in one run.

One training step as ``training.fit`` takes it — a batch of the cached, pre-resized dataset through
the DataLoader with the config's augmentation, resized to one of ``train.scales``, forward under
the loop's ``forward_context``, the config's loss with deep supervision, AdamW, the schedule and
the EMA — in five modes, the first four each adding one change to the one before:

- ``fp32 NCHW``: the loop before channels-last, and the structure loss as it was (a k×k
  ``avg_pool2d`` for its pixel weights, computed again for every deep-supervision output): "before";
- ``fp32 channels-last``: the channels-last layout;
- ``bf16 channels-last``: ``train.precision: bf16`` (autocast; weights stay fp32);
- ``bf16 CL, 1-D window``: what ``fit`` does now: the window mean as two 1-D passes, once per batch;
- ``fp32 CL, 1-D window``: what ``fit`` does where the CPU has no bf16 units (``precision: auto``
  falls back to fp32 there; emulated bf16 is slower), e.g. an AVX2-only machine.

With ``--scales 1.0 0.75 1.25`` it measures instead what multi-scale training costs: the shipped mode
at each scale alone (``train.scales: [s]``), ratios to the first scale given, and what ``fit`` runs at
with all of them, which draws each equally often: the harmonic mean of their rates (a dozen timed
steps of the mix itself would draw the scales unevenly).

Rounds are interleaved so every arm sees the same machine load; the median round is reported, and
the ratios to the first row are what to compare (the machine is shared and noisy).

    python bench/train_throughput.py [--steps 12] [--rounds 3] [--threads 2] [--set train.image_size=256]
    python bench/train_throughput.py --scales 1.0 0.75 1.25
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import cached_dataset
from lesionflow import config, losses, training
from lesionflow.data.manifest import read_manifest
from lesionflow.loop import TrainingLoop
from lesionflow.steps.train import new_segmenter
from lesionflow.training import (
    BatchRescaler,
    SegmentationDataset,
    labelled,
    train_loader,
    training_loss,
)

DATA = REPO.parent / "shared" / "data"
# (precision, layout, structure loss's window as two 1-D passes once per batch): each of the first
# four adds one change to the one before it; the last is the loop on a CPU without bf16 units.
MODES = {"fp32 NCHW (before)": ("fp32", torch.contiguous_format, False),
         "fp32 channels-last": ("fp32", torch.channels_last, False),
         "bf16 channels-last": ("bf16", torch.channels_last, False),
         "bf16 CL, 1-D window": ("bf16", torch.channels_last, True),
         "fp32 CL, 1-D window": ("fp32", torch.channels_last, True)}


def _square_box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def _weights_per_output(cfg, outputs, target, sample_weight=None):
    return [losses.structure_loss(logits, target, sample_weight=sample_weight) for logits in outputs]


@contextlib.contextmanager
def structure_loss_as(separable: bool):
    """The structure loss as ``fit`` has it, or (``separable`` False) as it was before: a k×k
    window mean, its pixel weights computed again for every deep-supervision output."""
    if separable:
        yield
        return
    with (mock.patch.object(losses, "box_mean", _square_box_mean),
          mock.patch.object(training, "segmentation_losses", _weights_per_output)):
        yield


def kvasir_params(extra: list[str]) -> config.Params:
    """``params.yaml`` + ``configs/kvasir-seg.yaml`` on the shared copy of the data, on the CPU."""
    return config.load([REPO / "params.yaml", REPO / "configs" / "kvasir-seg.yaml"],
                       [f"ingest.source={DATA / 'kvasir-seg'}", "train.device=cpu", *extra])


def train_throughput(params: config.Params, dataset_dir: Path, data: SegmentationDataset, steps: int,
                     layout: torch.memory_format = torch.channels_last) -> float:
    """Images/s of ``steps`` training steps as ``fit`` takes them (the first, warming allocators
    up, not counted). ``layout`` contiguous undoes the loop's channels-last: the earlier loop."""
    cfg = params.train
    model = new_segmenter(params, dataset_dir)
    loader, _ = train_loader(data, cfg, params.seed)
    rescale = BatchRescaler(cfg.scales, model.image_size, model.net.multiple, params.seed)
    loop = TrainingLoop(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=steps + 1,
                        ema_decay=cfg.ema_decay, precision=cfg.precision)
    for module in (model, loop.shipped):  # the weights and their moving average alike
        module.to(memory_format=layout)
    model.train()
    batches = iter(loader)
    seconds = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        image, mask, weight = next(batches)
        with loop.forward_context():
            loss = training_loss(model, *rescale(image, mask), weight, cfg)
        loop.step(loss)
        seconds += (time.perf_counter() - start) * (step > 0)
    return steps * cfg.batch_size / seconds


def arms(params: config.Params, scales: list[float] | None, multiple: int
         ) -> dict[str, tuple[config.Params, torch.memory_format, bool]]:
    """What to measure: name → (params, layout, structure loss as ``fit`` has it)."""
    if not scales:
        return {name: (params.with_section("train", precision=precision), layout, separable)
                for name, (precision, layout, separable) in MODES.items()}
    side = {s: BatchRescaler([s], params.train.image_size, multiple, params.seed).sides[0] for s in scales}
    return {f"scale {s:g} ({side[s]}px)": (params.with_section("train", scales=[s]), torch.channels_last, True)
            for s in scales}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lesionflow-model-bench")
    ap.add_argument("--set", action="append", default=[], help="params override, e.g. train.image_size=256")
    ap.add_argument("--scales", type=float, nargs="+",
                    help="instead of the modes: the shipped mode at each of these train.scales, and mixed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = kvasir_params(args.set)
    kvasir, _ = cached_dataset(params, args.work)
    records = labelled(read_manifest(kvasir), "train")
    model = new_segmenter(params, kvasir)
    data = SegmentationDataset(kvasir, records, model, augment=params.train.augment, seed=params.seed)
    measured = arms(params, args.scales, model.net.multiple)
    rates: dict[str, list[float]] = {name: [] for name in measured}
    for _ in range(args.rounds):
        for name, (arm_params, layout, separable) in measured.items():
            with structure_loss_as(separable or arm_params.train.loss != "structure"):
                rates[name].append(train_throughput(arm_params, kvasir, data, args.steps, layout))
    cfg, m = params.train, params.model
    print(f"training throughput, Kvasir-SEG train split ({len(records)} images): {m.arch} {m.base_channels}ch "
          f"at {cfg.image_size}px, batch {cfg.batch_size}, loss {cfg.loss}, augment {cfg.augment}; "
          f"{args.threads} threads, {args.rounds} rounds of {args.steps} steps (median); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU bf16 units: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    medians = {name: float(np.median(values)) for name, values in rates.items()}
    if args.scales:  # equally likely scales: the mix's time per image is the mean of theirs
        medians[f"mixed {args.scales}"] = 1 / np.mean([1 / rate for rate in medians.values()])
    first = next(iter(medians))
    for name, rate in medians.items():
        print(f"  {name:<24} {rate:6.1f} images/s   {rate / medians[first]:5.2f} x {first}")


if __name__ == "__main__":
    main()
