"""synthesize_video step: train the next-frame model G on the training videos, then

1. **propagate** key-frame masks through training videos whose other frames have no mask (the
   rolled masks become ``pseudo_label`` records the pseudo_label step scores like any label);
2. **synthesize** short videos from training stills (kind ``synthetic_video``, one folder per
   video under ``images/synthetic_video/<still id>/``), ``video.mix_ratio`` synthetic frames
   per real labelled training frame, so training mixes them in at that ratio.

The output is a new canonical dataset (same manifest schema, input files hard-linked); val and
test are untouched. Without training videos (or with ``video.enabled: false``) the dataset passes
through unchanged and the step says why. G itself, its three losses per step, and sample
rollouts (image strips and GIFs) go to the step's MLflow run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from lesionflow.config import Params
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import (
    Record,
    link_files,
    read_manifest,
    staged_dataset,
    write_png,
)
from lesionflow.data.transforms import (
    load_image,
    load_mask,
    resize_image,
    resize_mask,
    to_channels,
)
from lesionflow.errors import KeyFrameError
from lesionflow.progress import progress
from lesionflow.training import labelled, pick_device
from lesionflow.video.model import NextFrameModel
from lesionflow.video.synthesis import propagate_masks, rollout, select_frames
from lesionflow.video.train import (
    Video,
    load_video,
    save_next_frame,
    train_next_frame,
    video_groups,
)

REPORT = "synthesize_video_report.json"
SYNTH_DIR = "synthetic_video"
VIDEO_MODEL = "video_model"  # artifact folder of G in the step's run


@dataclass
class SynthesisReport:
    message: str
    counts: dict[str, int] = field(default_factory=dict)  # videos / synthetic / propagated
    stop_reason: str | None = None
    skipped_videos: list[str] = field(default_factory=list)  # no key-frame mask to roll from
    model_uri: str | None = None  # runs:/<step run>/video_model: G, which drew every mask it added


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) frame with the mask's outline in green."""
    out = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8).copy()
    m = mask[0] > 0.5
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = (0, 255, 0)
    return out


def log_rollout(images: np.ndarray, masks: np.ndarray, name: str) -> None:
    """A strip (frames left to right, mask outlines green) and an animated GIF in MLflow."""
    frames = [_overlay(i, m) for i, m in zip(images, masks)]
    mlflow.log_image(np.concatenate(frames, axis=1), f"rollouts/{name}.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.gif"
        pil = [Image.fromarray(f).resize((128, 128), Image.NEAREST) for f in frames]
        pil[0].save(path, save_all=True, append_images=pil[1:], duration=200, loop=0)
        mlflow.log_artifact(str(path), "rollouts")


def _loss_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    steps = [row["step"] for row in history]
    for key, label in (("image", "L_I"), ("mask1", "L_M1"), ("mask2", "L_M2"), ("total", "total")):
        ax.plot(steps, [row[key] for row in history], label=label)
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    return fig


def _load_videos(params: Params, dataset_dir: Path, records: list[Record], report: SynthesisReport
                 ) -> list[Video]:
    videos = []
    for name, frames in progress(video_groups(records).items(), "loading videos"):
        try:
            videos.append(load_video(dataset_dir, name, frames, params.video))
        except KeyFrameError as err:
            report.skipped_videos.append(f"{name}: {err}")
    return videos


def _propagate(model: NextFrameModel, videos: list[Video], dataset_dir: Path, tmp: Path, device,
               threshold: float, model_uri: str) -> dict[str, Record]:
    """Pseudo-labels (at each frame's native size) for the unlabelled frames of ``videos``."""
    updates: dict[str, Record] = {}
    for video in progress(videos, "propagating masks"):
        if video.known.all():
            continue
        probs = propagate_masks(model, video.frames, video.masks[video.key], video.key, device)
        for i in np.flatnonzero(~video.known):
            r = video.records[i]
            native = np.asarray(Image.fromarray(probs[i, 0]).resize((r.width, r.height), Image.BILINEAR))
            rel = f"masks/{r.id}.png"
            sha = write_png((native > threshold).astype(np.uint8) * 255, tmp / rel)
            updates[r.id] = r.model_copy(update={"kind": "pseudo_label", "mask": rel, "mask_sha256": sha,
                                                 "labelled_by": model_uri})
    return updates


def synthesize_frames(params: Params, model: NextFrameModel, dataset_dir: Path, records: list[Record],
                      tmp: Path, device, model_uri: str) -> list[Record]:
    """``mix_ratio`` × (real labelled train images) synthetic frames, rolled from those images in
    seeded order and written under ``tmp``. Any truly labelled image is a still here (a video
    frame too: one frame alone is a still image)."""
    cfg = params.video
    real = [r for r in labelled(records, "train") if r.kind != "synthetic_video"]
    stills = [r for r in real if r.kind in ("still", "video_frame", "correction")]
    target = round(cfg.mix_ratio * len(real))
    if not stills or not target:
        return []
    order = np.random.default_rng(params.seed).permutation(len(stills))
    size, out = cfg.image_size, []
    logged = 0
    for i in progress(order, "synthesizing"):
        if len(out) >= target:
            break
        still = stills[i]
        image = resize_image(to_channels(load_image(dataset_dir, still), 3), size).transpose(2, 0, 1)
        mask = resize_mask(load_mask(dataset_dir, still), size)[None].astype(np.float32)
        images, masks = rollout(model.to(device), torch.from_numpy(image[None] / np.float32(255)).to(device),
                                torch.from_numpy(mask[None]).to(device), cfg.synth_steps)
        images, masks = images[:, 0].cpu(), masks[:, 0].cpu()
        if logged < cfg.n_rollouts_logged:
            log_rollout(images.numpy(), masks.numpy(), f"synthetic_{still.id}")
            logged += 1
        keep = select_frames(images, cfg.keep, every_k=cfg.every_k, threshold=cfg.keep_threshold,
                             similarity_kind=cfg.similarity)
        folder = f"{SYNTH_DIR}/{still.id}"
        (tmp / "images" / folder).mkdir(parents=True, exist_ok=True)
        (tmp / "masks" / folder).mkdir(parents=True, exist_ok=True)
        for t in keep[: target - len(out)]:
            rel_image, rel_mask = f"images/{folder}/f{t:03d}.png", f"masks/{folder}/f{t:03d}.png"
            frame = (images[t].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
            out.append(Record(
                id=f"{still.id}_syn{t:03d}", kind="synthetic_video", image=rel_image, mask=rel_mask,
                image_sha256=write_png(frame, tmp / rel_image),
                mask_sha256=write_png((masks[t, 0].numpy() > params.evaluate.threshold).astype(np.uint8) * 255,
                                      tmp / rel_mask),
                height=size, width=size, channels=3, lesion_type=still.lesion_type, group=still.group,
                split="train", frame_index=t, source=still.image, labelled_by=model_uri))
    return out


def synthesize_video(params: Params, dataset_dir: Path, out_dir: Path) -> SynthesisReport:
    cfg = params.video
    records = read_manifest(dataset_dir)
    report = SynthesisReport("")
    videos = _load_videos(params, dataset_dir, records, report) if cfg.enabled else []
    mlflow.log_params({f"video.{k}": v for k, v in cfg.model_dump().items()})
    with staged_dataset(out_dir) as tmp:
        for record in records:
            link_files(record, dataset_dir, tmp)
        out = records
        if not cfg.enabled:
            report.message = "video.enabled is false: dataset passed through unchanged"
        elif not videos:
            report.message = ("no training video with a key-frame mask: no next-frame model trained, "
                              "dataset passed through unchanged")
        else:
            device = pick_device(params.train.device)

            def log_step(row: dict) -> None:
                mlflow.log_metrics({f"loss_{k}": row[k] for k in ("image", "mask1", "mask2", "truth", "total")}
                                   | ({"loss_gan": row["gan"]} if cfg.gan_weight else {}), step=row["step"])

            model, result = train_next_frame(videos, cfg, seed=params.seed, device=params.train.device,
                                             on_step=log_step)
            report.stop_reason = result.stop_reason
            mlflow.log_figure(_loss_figure(result.history), "video_losses.png")
            with tempfile.TemporaryDirectory() as model_tmp:
                mlflow.log_artifact(str(save_next_frame(model, Path(model_tmp) / "next_frame.pt")), VIDEO_MODEL)
            report.model_uri = f"runs:/{mlflow.active_run().info.run_id}/{VIDEO_MODEL}"
            updates = (_propagate(model, videos, dataset_dir, tmp, device, params.evaluate.threshold,
                                  report.model_uri) if cfg.propagate else {})
            out = [updates.get(r.id, r) for r in records]
            synthetic = synthesize_frames(params, model, dataset_dir, records, tmp, device,
                                          report.model_uri)
            out += synthetic
            for video in videos[: cfg.n_rollouts_logged]:
                probs = propagate_masks(model, video.frames, video.masks[video.key], video.key, device)
                log_rollout(video.frames, probs, f"propagated_{video.name}")
            report.counts = {"videos": len(videos), "synthetic": len(synthetic), "propagated": len(updates)}
            report.message = (f"next-frame model trained on {len(videos)} video(s), stopped at "
                              f"{result.stop_reason}; {len(updates)} frame(s) pseudo-labelled by propagation, "
                              f"{len(synthetic)} synthetic video frame(s) added")
        write_index(tmp, out)
        (tmp / REPORT).write_text(json.dumps(report.__dict__, indent=2, sort_keys=True) + "\n")
    print(report.message)
    if report.skipped_videos:
        print("videos without a key-frame mask (not used): " + "; ".join(report.skipped_videos[:5]))
    mlflow.log_metrics({f"n_{k}": v for k, v in report.counts.items()})
    mlflow.log_dict(report.__dict__, REPORT)
    return report
