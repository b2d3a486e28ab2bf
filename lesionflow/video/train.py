"""Training the next-frame model G on videos (seed 001).

A training step samples one clip per video in the batch (``video.order``: forward, backward,
fused = either direction at random, key_centred = starting at the key frame and running away
from it), starts from M̂_0 = the key-frame mask (or a random blob), and rolls G along the clip
feeding the real current image and G's own previous mask (or, with probability
``teacher_forcing``, the true mask where one exists). Per transition t → t+1:

- L_I  = φ_img(I_t+1, Î_t+1)
- L_M1 = θ(φ_mask(M̂_t, M̂_t+1), d(I_t, I_t+1))
- L_M2 = θ(φ_mask(M_k, M̂_t+1), d(I_k, I_t+1)), k the key frame
- L_T  = φ_mask(M_t+1, M̂_t+1) where the true mask is known (``truth_weight``; 0 = spec only)
- L_G  = the generator's adversarial loss when ``gan_weight`` > 0

averaged over transitions and clips, summed with their weights. Training stops at
``max_steps``, when the smoothed total drops below ``loss_threshold``, or after ``patience``
steps without a new best smoothed total.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lesionflow.config import VideoConfig
from lesionflow.data.manifest import Record
from lesionflow.data.transforms import (
    load_image,
    load_mask,
    resize_image,
    resize_mask,
    to_channels,
)
from lesionflow.errors import KeyFrameError
from lesionflow.progress import progress
from lesionflow.training import pick_device
from lesionflow.video.keyframes import choose_key_frame
from lesionflow.video.losses import phi, similarity, theta
from lesionflow.video.model import NextFrameModel, PatchDiscriminator

LOSS_NAMES = ("image", "mask1", "mask2", "truth", "gan", "total")


@dataclass
class Video:
    """One video at G's working size: frames (T, 3, S, S) in [0, 1], masks (T, 1, S, S) in {0, 1}
    (zeros where unknown), ``known`` (T,) marks true masks, ``key`` the key-frame index."""

    name: str
    records: list[Record]
    frames: np.ndarray
    masks: np.ndarray
    known: np.ndarray
    key: int


def video_groups(records: list[Record], split: str | None = "train") -> dict[str, list[Record]]:
    """Frames of each video (by group) in frame order; one-frame videos have no motion to learn."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.kind == "video_frame" and r.frame_index is not None and (
                split is None or r.split == split):
            groups[r.group].append(r)
    return {g: sorted(rs, key=lambda r: r.frame_index) for g, rs in sorted(groups.items()) if len(rs) > 1}


def load_video(dataset_dir: Path, name: str, records: list[Record], cfg: VideoConfig,
               hide_masks: bool = False) -> Video:
    """Decode one video. The key frame is the metadata's (if it has a mask) unless
    ``key_frames: auto``; else the best-scoring labelled frame. ``hide_masks`` keeps only the key
    frame's mask (propagation experiments: the others become unknown)."""
    size = cfg.image_size
    frames = np.stack([resize_image(to_channels(load_image(dataset_dir, r), 3), size).transpose(2, 0, 1)
                       for r in records]).astype(np.float32) / 255
    known = np.array([r.mask is not None and r.kind == "video_frame" for r in records])
    masks = np.zeros((len(records), 1, size, size), np.float32)
    for i in np.flatnonzero(known):
        masks[i, 0] = resize_mask(load_mask(dataset_dir, records[i]), size)
    marked = [i for i, r in enumerate(records) if r.key_frame and known[i]]
    if not known.any():
        raise KeyFrameError(f"video {name!r} has no frame with a true mask: no key frame to roll from")
    if cfg.key_frames == "metadata" and marked:
        key = marked[0]
    else:
        key = choose_key_frame(frames, masks, known, sharpness_weight=cfg.sharpness_weight,
                               centrality_weight=cfg.centrality_weight,
                               brightness_weight=cfg.brightness_weight)
    if hide_masks:
        known = np.arange(len(records)) == key
        masks = masks * known[:, None, None, None]
    return Video(name, records, frames, masks, known, key)


def random_blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ellipse (1, S, S): M̂_0 when ``initial_mask: random``."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.1, 0.25, 2) * size
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.float32)[None]


def clip_indices(video: Video, order: str, length: int, rng: np.random.Generator) -> list[int]:
    """Frame indices of one training clip (at most ``length`` long, at least 2)."""
    n = len(video.frames)
    length = min(length, n)
    if order == "fused":
        order = "forward" if rng.random() < 0.5 else "backward"
    if order in ("forward", "backward"):
        start = int(rng.integers(0, n - length + 1))
        idx = list(range(start, start + length))
        return idx if order == "forward" else idx[::-1]
    if order != "key_centred":
        raise ValueError(f"unknown video order {order!r}")
    k = video.key
    forward, backward = list(range(k, min(n, k + length))), list(range(k, max(-1, k - length), -1))
    options = [c for c in (forward, backward) if len(c) >= 2]
    return options[int(rng.integers(len(options)))]


@dataclass
class VideoTrainResult:
    steps: int
    stop_reason: str
    seconds: float
    history: list[dict] = field(default_factory=list)


def _augment(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """The same quarter turn and flip on every frame of a clip."""
    t = torch.rot90(t, k, dims=(-2, -1))
    return t.flip(-1) if flip else t


def clip_losses(model: NextFrameModel, frames: torch.Tensor, masks: torch.Tensor, known: torch.Tensor,
                key_image: torch.Tensor, key_mask: torch.Tensor, start_mask: torch.Tensor,
                cfg: VideoConfig, rng: np.random.Generator,
                discriminator: PatchDiscriminator | None = None) -> dict[str, torch.Tensor]:
    """The loss terms (scalars) of a batch of clips: frames (L, B, 3, S, S), masks (L, B, 1, S, S),
    known (L, B), key image/mask (B, ...), start mask (B, 1, S, S)."""
    sums = {name: frames.new_zeros(()) for name in LOSS_NAMES[:-1]}
    n_truth = frames.new_zeros(())
    mask_in = start_mask
    steps = len(frames) - 1
    for t in range(steps):
        image, following = frames[t], frames[t + 1]
        pred_image, logits = model(image, mask_in, following)
        pred_mask = torch.sigmoid(logits)
        sums["image"] = sums["image"] + phi(pred_image, following, cfg.image_phi).mean()
        d_step = similarity(image, following, cfg.similarity)
        sums["mask1"] = sums["mask1"] + theta(phi(mask_in, pred_mask, cfg.mask_phi), d_step,
                                              gamma1=cfg.gamma1, gamma2=cfg.gamma2).mean()
        d_key = similarity(key_image, following, cfg.similarity)
        sums["mask2"] = sums["mask2"] + theta(phi(key_mask, pred_mask, cfg.mask_phi), d_key,
                                              gamma1=cfg.gamma1, gamma2=cfg.gamma2).mean()
        has = known[t + 1].float()
        sums["truth"] = sums["truth"] + (phi(masks[t + 1], pred_mask, cfg.mask_phi) * has).sum()
        n_truth = n_truth + has.sum()
        if discriminator is not None:
            fake = discriminator(image, pred_image)
            sums["gan"] = sums["gan"] + F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
        force = torch.from_numpy(rng.random(len(has)) < cfg.teacher_forcing).to(has.device) & (has > 0)
        mask_in = torch.where(force[:, None, None, None], masks[t + 1], pred_mask)
    out = {k: v / steps for k, v in sums.items()}
    out["truth"] = sums["truth"] / n_truth.clamp(min=1)
    out["total"] = (cfg.image_weight * out["image"] + cfg.mask1_weight * out["mask1"]
                    + cfg.mask2_weight * out["mask2"] + cfg.truth_weight * out["truth"]
                    + cfg.gan_weight * out["gan"])
    return out


def _batch(videos: list[Video], cfg: VideoConfig, rng: np.random.Generator, device: torch.device):
    chosen = rng.choice(len(videos), size=cfg.batch_size, replace=len(videos) < cfg.batch_size)
    clips = [(videos[i], clip_indices(videos[i], cfg.order, cfg.clip_length, rng)) for i in chosen]
    length = min(len(idx) for _, idx in clips)
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)

    def stack(get) -> torch.Tensor:
        return _augment(torch.from_numpy(np.stack([get(v, idx[:length]) for v, idx in clips], 1)), k, flip
                        ).to(device)

    frames = stack(lambda v, idx: v.frames[idx])
    masks = stack(lambda v, idx: v.masks[idx])
    known = torch.from_numpy(np.stack([v.known[idx[:length]] for v, idx in clips], 1)).to(device)
    key_image = _augment(torch.from_numpy(np.stack([v.frames[v.key] for v, _ in clips])), k, flip).to(device)
    key_mask = _augment(torch.from_numpy(np.stack([v.masks[v.key] for v, _ in clips])), k, flip).to(device)
    if cfg.initial_mask == "key":
        start = key_mask
    else:
        start = _augment(torch.from_numpy(np.stack([random_blob(cfg.image_size, rng) for _ in clips])),
                         k, flip).to(device)
    return frames, masks, known, key_image, key_mask, start


def train_next_frame(videos: list[Video], cfg: VideoConfig, *, seed: int, device: str = "auto",
                     on_step: Callable[[dict], None] | None = None) -> tuple[NextFrameModel, VideoTrainResult]:
    """Train G on ``videos`` until the stop condition; returns G (on CPU, eval mode)."""
    if not videos:
        raise KeyFrameError("no videos with a key-frame mask to train the next-frame model on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = pick_device(device)
    model = NextFrameModel(cfg.architecture, cfg.base_channels, cfg.depth,
                           mask_sees_next=cfg.mask_sees_next).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    discriminator = d_optimizer = None
    if cfg.gan_weight > 0:
        discriminator = PatchDiscriminator(base_channels=cfg.base_channels).to(dev)
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    history: list[dict] = []
    smoothed, best, since_best = None, float("inf"), 0
    stop_reason = f"max_steps ({cfg.max_steps})"
    start = time.monotonic()
    model.train()
    for step in progress(range(cfg.max_steps), "next-frame model"):
        frames, masks, known, key_image, key_mask, start_mask = _batch(videos, cfg, rng, dev)
        losses = clip_losses(model, frames, masks, known, key_image, key_mask, start_mask, cfg, rng,
                             discriminator)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        if discriminator is not None:
            _discriminator_step(model, discriminator, d_optimizer, frames, start_mask)
        row = {"step": step, **{k: v.item() for k, v in losses.items()}}
        history.append(row)
        if on_step:
            on_step(row)
        smoothed = row["total"] if smoothed is None else 0.9 * smoothed + 0.1 * row["total"]
        if smoothed < best:
            best, since_best = smoothed, 0
        else:
            since_best += 1
        if cfg.loss_threshold is not None and smoothed < cfg.loss_threshold:
            stop_reason = f"smoothed loss {smoothed:.4f} < loss_threshold {cfg.loss_threshold}"
            break
        if cfg.patience is not None and since_best >= cfg.patience:
            stop_reason = f"no better smoothed loss for {cfg.patience} steps (patience)"
            break
    model.to("cpu").eval()
    return model, VideoTrainResult(len(history), stop_reason, time.monotonic() - start, history)


def _discriminator_step(model: NextFrameModel, discriminator: PatchDiscriminator,
                        optimizer: torch.optim.Optimizer, frames: torch.Tensor, start_mask: torch.Tensor) -> None:
    """One update telling real transitions (I_0, I_1) from G's (I_0, Î_1)."""
    with torch.no_grad():
        fake_next, _ = model(frames[0], start_mask)
    real = discriminator(frames[0], frames[1])
    fake = discriminator(frames[0], fake_next)
    loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def save_next_frame(model: NextFrameModel, path: Path) -> Path:
    torch.save({"hparams": model.hparams, "state_dict": model.state_dict()}, path)
    return path


def load_next_frame(path: Path) -> NextFrameModel:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = NextFrameModel(**blob["hparams"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
