"""Supervised training of a ``Segmenter``: in-memory dataset, ``train.loss``, best-on-validation.

Meta-training (a later step) reuses ``SegmentationDataset`` and the loss; this module is the
plain baseline it is compared against.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)

from lesionflow import distributed
from lesionflow.config import TrainConfig
from lesionflow.data.augment import Augmenter, Strength
from lesionflow.data.manifest import Record
from lesionflow.data.transforms import load_image, load_target
from lesionflow.errors import ConfigError
from lesionflow.loop import TrainingLoop
from lesionflow.losses import segmentation_losses
from lesionflow.models.segmenter import Segmenter
from lesionflow.progress import progress

LABELLED_KINDS = {"still", "video_frame", "correction", "pseudo_label", "synthetic_video"}


def labelled(records: list[Record], split: str) -> list[Record]:
    """Records of ``split`` that carry a pixel mask."""
    return [r for r in records if r.split == split and r.mask is not None and r.kind in LABELLED_KINDS]


class SegmentationDataset(Dataset):
    """Images and masks decoded and resized once, held as uint8 (a 1000-image set at 256² is
    ~200 MB), so epochs cost compute, not PNG decoding."""

    def __init__(self, dataset_dir: Path, records: list[Record], model: Segmenter,
                 augment: Strength = "none", seed: int = 0, sample_weights: list[float] | None = None):
        if not records:
            raise ValueError("no labelled records to train or validate on")
        size = model.image_size
        self.images = np.stack([model.prepare(load_image(dataset_dir, r))
                                for r in progress(records, "loading")])
        # int8 targets: 1 lesion, 0 background, -1 ignore (area-ratio pseudo-labels)
        self.masks = np.stack([load_target(dataset_dir, r, size)[None] for r in records])
        self.weights = np.asarray(sample_weights or [1.0] * len(records), dtype=np.float32)
        self.augmenter = Augmenter(augment, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, mask = self.augmenter(self.images[i], self.masks[i])
        return torch.from_numpy(image), torch.from_numpy(mask), torch.tensor(self.weights[i])


def reseed_worker(_: int) -> None:
    """DataLoader ``worker_init_fn``: this worker's own augmentation stream (see data/augment.py),
    and this rank's (the loader's seed is the same on every rank)."""
    info = get_worker_info()
    info.dataset.augmenter.reseed(distributed.rank_seed(info.seed) % 2**32)


@dataclass
class FitResult:
    best_epoch: int
    best_val_dice: float
    epochs_run: int  # fewer than train.epochs when train.max_minutes shortened the schedule
    seconds: float
    precision: str  # "bf16" | "fp32": what train.precision ("auto": by the hardware) resolved to
    history: list[dict] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    """``train.device`` resolved; a rank of a distributed job gets its own GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible: set train.device: "
                          "auto (a GPU where there is one) or cpu")
    if name == "cuda" and distributed.initialized():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same data, params and seed → same weights (``lesionflow reproduce``): the initial weights
    are drawn after this, whatever the process did before, and ``deterministic`` picks
    deterministic kernels (warn_only keeps the few ops without one usable; cuBLAS needs its
    workspace pinned for that)."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@torch.no_grad()
def validation_dice(model: Segmenter, data: SegmentationDataset, device: torch.device,
                    batch_size: int) -> float:
    """Mean per-image hard Dice at training resolution (cheap model selection, not the report);
    ignore pixels (target -1) count on neither side."""
    model.eval()
    scores = []
    for image, mask, _ in DataLoader(data, batch_size=batch_size):
        mask = mask.to(device)
        pred = (model(image.to(device)) > 0).float() * (mask >= 0)
        mask = mask.clamp(min=0)
        inter = (pred * mask).flatten(1).sum(1)
        total = pred.flatten(1).sum(1) + mask.flatten(1).sum(1)
        scores += torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0).tolist()
    return float(np.mean(scores))


def fit(model: Segmenter, train: SegmentationDataset | IterableDataset, val: SegmentationDataset,
        cfg: TrainConfig, *, seed: int, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train (``loop.TrainingLoop``: AdamW, one-cycle LR, optional EMA); keep the weights of the
    best validation epoch.

    ``train`` is an in-memory set, shuffled each epoch, or an ``IterableDataset`` that orders (and,
    per rank, splits) itself and whose ``len`` is what it yields per epoch (``data.shards``). In a
    process group each rank trains on its ``DistributedSampler`` part of an in-memory set with
    ``cfg.batch_size`` (the loop averages the gradients), and only rank 0 calls ``on_epoch``."""
    torch.manual_seed(seed)
    device = pick_device(cfg.device)
    model.to(device)
    loader, sampler = train_loader(train, cfg, seed)
    rescale = BatchRescaler(cfg.scales, model.image_size, model.net.multiple, seed)
    loop = TrainingLoop(model, lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=cfg.epochs * len(loader),
                        ema_decay=cfg.ema_decay, max_minutes=cfg.max_minutes, precision=cfg.precision)
    history: list[dict] = []
    epochs, epoch = cfg.epochs, 0
    while epoch < epochs:
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        losses = []
        for image, mask, weight in progress(loader, f"epoch {epoch + 1}/{epochs}"):
            with loop.forward_context():
                loss = training_loss(model, *rescale(image.to(device), mask.to(device)), weight.to(device), cfg)
            losses.append(loop.step(loss))
        row = {"epoch": epoch, **distributed.mean_over_ranks({"train_loss": float(np.mean(losses))}),
               "val_dice": validation_dice(loop.shipped, val, device, cfg.batch_size),
               "lr": loop.lr, "seconds": loop.seconds}
        history.append(row)
        if on_epoch and distributed.is_main():
            on_epoch(row)
        loop.select(epoch, row["val_dice"])
        epoch += 1
        planned, epochs = epochs, loop.epochs_in_budget(epoch, epochs)
        if epochs < planned and distributed.is_main():
            print(f"train.max_minutes {cfg.max_minutes:g}: at {loop.seconds / 60 / epoch:.2f} min per epoch "
                  f"{planned} epochs would not fit; the schedule now ends after epoch {epochs}")
    loop.finish()
    return FitResult(loop.best_at, loop.best_score, len(history), loop.seconds, loop.precision, history)


class BatchRescaler:
    """Multi-scale training: each batch resized to one of the sides ``scales`` give at
    ``image_size``, rounded to the network's ``multiple``. The draw has its own generator, so the
    weights, shuffling and augmentation streams are those of a run at one scale, and
    ``scales: [1.0]`` trains exactly as before."""

    def __init__(self, scales: list[float], image_size: int, multiple: int, seed: int):
        self.sides = sorted({max(multiple, round(image_size * scale / multiple) * multiple)
                             for scale in scales})
        self.rng = random.Random(seed)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.rng.choice(self.sides) if len(self.sides) > 1 else self.sides[0]
        if side == image.shape[-1] == image.shape[-2]:
            return image, target
        # nearest keeps the target's three values (lesion, background, ignore) apart
        return (F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False),
                F.interpolate(target, size=(side, side), mode="nearest"))


def train_loader(train: SegmentationDataset | IterableDataset, cfg: TrainConfig,
                 seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The epoch's batches (and the sampler to tell the epoch, when there is one).

    Alone: shuffled by a generator seeded with ``seed``. In a process group: ``DistributedSampler``
    draws one permutation from ``seed`` on every rank and each takes every W-th sample, so the W
    ranks' batch k together hold the samples one process's batch k of W·b would; each rank
    augments with its own seed."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(train, IterableDataset):
        return DataLoader(train, batch_size=cfg.batch_size, drop_last=len(train) > cfg.batch_size,
                          num_workers=cfg.num_workers, worker_init_fn=reseed_worker,
                          generator=generator), None
    if not distributed.initialized():
        return DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size,
                          num_workers=cfg.num_workers, worker_init_fn=reseed_worker,
                          generator=generator), None
    sampler = DistributedSampler(train, seed=seed)
    train.augmenter.reseed(distributed.rank_seed(seed))
    return DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(sampler) > cfg.batch_size,
                      num_workers=cfg.num_workers, worker_init_fn=reseed_worker, generator=generator), sampler


def training_loss(model: Segmenter, image: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  cfg: TrainConfig) -> torch.Tensor:
    """``cfg.loss`` on the final logits, plus ``cfg.deep_supervision`` times its mean over the
    coarser decoder levels' own logits (deep supervision). The loss itself runs in fp32 whatever
    precision the network ran in (its sums over a whole image lose too much in bf16)."""
    if not cfg.deep_supervision:
        return segmentation_losses(cfg, [model(image).float()], target, weight)[0]
    final, *coarser = segmentation_losses(cfg, [logits.float() for logits in model.forward_all(image)],
                                          target, weight)
    return final + cfg.deep_supervision * torch.stack(coarser).mean()
