"""Key-frame mask propagation through held-out video: the ``propagation`` kind of
``bench/experiment.py`` (issue 16, seed 001; arms in ``experiments/video-cvc.yaml``).

One arm run on a video dataset split by sequence (CVC-ClinicDB): in every validation and test
sequence all masks but the key frame's are hidden (``load_video(hide_masks=True)``, the key frame
as the pipeline picks it), the key mask is carried to every other frame, and each frame's Dice
with its true mask is taken at the frame's own resolution. ``val_dice`` / ``test_dice`` are the
means over the non-key frames of each split. Methods (``method`` in the arm):

- ``copy``: the key mask unchanged on every frame (the trivial baseline);
- ``flow``: the key mask warped frame by frame along dense optical flow (OpenCV's Farnebäck,
  native resolution) — the classical baseline;
- ``G``: the next-frame model trained on the training sequences (``train_next_frame``, the arm's
  ``video.*`` overrides, the run's seed), rolled from the key frame (``propagate_masks``).
  ``gamma1_quantile: q`` sets γ1 to the q-quantile of the SSIM between consecutive frames of the
  validation sequences (no masks needed), so that the share 1 − q of pairs counts as similar.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from lesionflow.config import Params
from lesionflow.data.manifest import read_manifest
from lesionflow.data.transforms import load_image, load_mask, to_channels
from lesionflow.metrics import dice
from lesionflow.video.losses import similarity
from lesionflow.video.synthesis import propagate_masks
from lesionflow.video.train import Video, load_video, train_next_frame, video_groups

METHODS = ("copy", "flow", "G")


def flow_warp(frames: list[np.ndarray], key_mask: np.ndarray, key: int) -> list[np.ndarray]:
    """The key mask carried outwards along Farnebäck flow: each new frame's pixel looks up where
    it came from in the previous frame's warped mask. frames: gray uint8 (H, W)."""
    out: list[np.ndarray | None] = [None] * len(frames)
    out[key] = key_mask.astype(np.float32)
    h, w = key_mask.shape
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    for direction in (1, -1):
        t = key
        while 0 <= t + direction < len(frames):
            flow = cv2.calcOpticalFlowFarneback(frames[t + direction], frames[t], None, pyr_scale=0.5, levels=4,
                                                winsize=21, iterations=3, poly_n=7, poly_sigma=1.5, flags=0)
            out[t + direction] = cv2.remap(out[t], grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            t += direction
    return out


def consecutive_ssim(videos: list[Video], kind: str) -> np.ndarray:
    """Similarity d of every pair of consecutive frames in ``videos``."""
    values = []
    for video in videos:
        f = torch.from_numpy(video.frames)
        values += similarity(f[:-1], f[1:], kind).tolist()
    return np.asarray(values)


def run_arm(params: Params, dataset: Path, arm: dict, seed: int, cache: Path) -> dict[str, float]:
    method = arm.get("method")
    if method not in METHODS:
        raise SystemExit(f"method must be one of {METHODS}, not {method!r}")
    records = read_manifest(dataset)
    # every mask but the key frame's hidden, decoded once for γ1 and for scoring
    held_out = {split: [load_video(dataset, name, frames, params.video, hide_masks=True)
                        for name, frames in video_groups(records, split).items()] for split in ("val", "test")}
    metrics: dict[str, float] = {}
    model = None
    if method == "G":
        cfg = params.video
        if "gamma1_quantile" in arm:
            ssim = consecutive_ssim(held_out["val"], cfg.similarity)
            cfg = cfg.model_copy(update={"gamma1": float(np.quantile(ssim, arm["gamma1_quantile"]))})
            metrics["gamma1"] = cfg.gamma1
        videos = [load_video(dataset, name, frames, cfg) for name, frames in video_groups(records, "train").items()]
        model, _ = train_next_frame(videos, cfg, seed=seed, device="cpu")
    for split, videos in held_out.items():
        scores = []
        for video in videos:
            frames = video.records
            truths = [load_mask(dataset, r).astype(bool) for r in frames]
            if method == "copy":
                preds = [truths[video.key]] * len(frames)
            elif method == "flow":
                gray = [to_channels(load_image(dataset, r), 1)[..., 0] for r in frames]
                preds = [p > 0.5 for p in flow_warp(gray, truths[video.key], video.key)]
            else:
                probs = propagate_masks(model, video.frames, video.masks[video.key], video.key)
                preds = [np.asarray(Image.fromarray(probs[t, 0]).resize((r.width, r.height), Image.BILINEAR)) > 0.5
                         for t, r in enumerate(frames)]
            scores += [dice(p, t) for i, (p, t) in enumerate(zip(preds, truths, strict=True)) if i != video.key]
        metrics[f"{split}_dice"] = float(np.mean(scores))
    return metrics
