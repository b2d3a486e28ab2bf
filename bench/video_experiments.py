"""Video synthesis on real video: CVC-ClinicDB (29 colonoscopy sequences, a mask on every frame),
split by sequence with the pipeline's own ingest.

    python bench/video_experiments.py mixin [--set video.key=value ...]

(Propagation through held-out sequences — G vs copying the key mask vs an optical-flow warp — is
the ``propagation`` kind of ``bench/experiment.py``, ``experiments/video-cvc.yaml``.)

``mixin``: plain U-Net training on the training frames vs the same plus ``video.mix_ratio``
synthetic video frames rolled by G from training frames, with the same budget in optimizer
steps; test-split Dice and temporal consistency (mean Dice of consecutive predicted masks; the
ground truth's own value is printed for reference).

One CPU thread (the machine is shared); sizes are small (``--size``, default 96²), so absolute
numbers are low; the comparisons are the point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
import torch

from lesionflow import config
from lesionflow.data.fingerprint import compute_fingerprint
from lesionflow.data.manifest import (
    FINGERPRINT,
    link_or_copy,
    read_manifest,
    staged_dataset,
    write_manifest,
)
from lesionflow.data.transforms import load_image, load_mask, resize_prob
from lesionflow.metrics import dice, temporal_consistency
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.synthesize_video import synthesize_frames
from lesionflow.steps.train import new_segmenter
from lesionflow.training import SegmentationDataset, fit, labelled
from lesionflow.video.train import (
    load_next_frame,
    load_video,
    save_next_frame,
    train_next_frame,
    video_groups,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LESIONFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
SYNTHESIS_ONLY = {"mix_ratio", "synth_steps", "keep", "every_k", "keep_threshold", "propagate",
                  "n_rollouts_logged"}


def load_params(size: int, overrides: list[str]) -> config.Params:
    base = [f"video.image_size={size}", "video.base_channels=16", "video.depth=3", "video.max_steps=500",
            "video.key_frames=auto", "video.n_rollouts_logged=0", f"train.image_size={size}",
            f"ingest.source={SHARED_DATA / 'cvc-clinicdb'}"]
    return config.load([REPO / "params.yaml", REPO / "configs/cvc-clinicdb.yaml"], base + overrides)


def dataset(params: config.Params, work: Path) -> Path:
    out = work / "cvc"
    if not (out / "manifest.jsonl").exists():
        build_dataset(params, out)
    return out


def g_key(params: config.Params) -> str:
    training = params.video.model_dump_json(exclude=SYNTHESIS_ONLY)
    return hashlib.sha256(training.encode()).hexdigest()[:12]


def trained_g(params: config.Params, data: Path, work: Path):
    """G trained on the training sequences, cached per video config (both experiments share it)."""
    path = work / f"G_{g_key(params)}.pt"
    if path.exists():
        return load_next_frame(path)
    records = read_manifest(data)
    videos = [load_video(data, name, frames, params.video) for name, frames in video_groups(records).items()]
    start = time.monotonic()
    model, result = train_next_frame(videos, params.video, seed=params.seed)
    print(f"G: {len(videos)} training sequences, {result.steps} steps in {time.monotonic() - start:.0f}s, "
          f"stop: {result.stop_reason}; final losses " + ", ".join(
              f"{k} {np.mean([r[k] for r in result.history[-20:]]):.3f}" for k in ("image", "mask1", "mask2", "truth")))
    save_next_frame(model, path)
    return model


def _score(model, data: Path, records, threshold: float) -> tuple[float, float, float]:
    """Test Dice at native size, and temporal consistency of predicted / true masks per sequence."""
    dices, preds, truths = [], defaultdict(list), defaultdict(list)
    for group, frames in video_groups(records, "test").items():
        for r in frames:
            image = model.prepare(load_image(data, r))
            with torch.no_grad():
                prob = torch.sigmoid(model(torch.from_numpy(image[None]).float()))[0, 0].numpy()
            pred = resize_prob(prob, r.height, r.width) > threshold
            truth = load_mask(data, r)
            dices.append(dice(pred, truth))
            preds[group].append((r.frame_index, pred))
            truths[group].append((r.frame_index, truth))
    return float(np.mean(dices)), temporal_consistency(preds), temporal_consistency(truths)


def mixin(params: config.Params, work: Path, epochs: int, seeds: list[int]) -> None:
    data = dataset(params, work)
    records = read_manifest(data)
    mixed = work / f"cvc_mixed_{g_key(params)}_{params.video.mix_ratio}"
    if not (mixed / "manifest.jsonl").exists():
        model = trained_g(params, data, work)
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        with mlflow.start_run(), staged_dataset(mixed) as tmp:
            for r in records:
                for rel in (r.image, r.mask):
                    if rel:
                        link_or_copy(data / rel, tmp / rel)
            out = records + synthesize_frames(params, model, data, records, tmp, "cpu",
                                              f"bench:{g_key(params)}")
            write_manifest(tmp, out)
            (tmp / FINGERPRINT).write_text(json.dumps(compute_fingerprint(out, tmp)))
    rows = defaultdict(list)
    n_real = len(labelled(records, "train"))
    for seed in seeds:
        for arm, folder in (("real only", data), (f"real + synthetic (ratio {params.video.mix_ratio})", mixed)):
            recs = read_manifest(folder)
            train = labelled(recs, "train")
            # same budget: as many optimizer steps as `epochs` epochs over the real frames alone
            arm_epochs = max(1, round(epochs * n_real / len(train)))
            cfg = params.train.model_copy(update={"epochs": arm_epochs})
            torch.manual_seed(seed)  # both arms start from the same initial weights
            seg = new_segmenter(params, data)
            fit(seg, SegmentationDataset(folder, train, seg, augment="flips", seed=seed),
                SegmentationDataset(folder, labelled(recs, "val"), seg), cfg, seed=seed)
            rows[arm].append((len(train), arm_epochs, *_score(seg, data, records, params.evaluate.threshold)))
            print(f"seed {seed} | {arm} | test Dice {rows[arm][-1][2]:.3f} | temporal consistency {rows[arm][-1][3]:.3f}")
    print(f"plain U-Net {params.model.base_channels} ch depth {params.model.depth}, {params.train.image_size}², "
          f"same budget ≈ {epochs} epochs over the {n_real} real frames; test split of CVC; seeds {seeds}")
    print("arm | train images | epochs | test Dice mean (min–max) | temporal consistency pred mean (min–max) | truth")
    for arm, runs in rows.items():
        n, e, _, _, tct = runs[0]
        d, tc = np.array([r[2] for r in runs]), np.array([r[3] for r in runs])
        print(f"{arm} | {n} | {e} | {d.mean():.3f} ({d.min():.3f}–{d.max():.3f}) | "
              f"{tc.mean():.3f} ({tc.min():.3f}–{tc.max():.3f}) | {tct:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["mixin"])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8, help="mixin: budget in epochs over the real frames")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mixin: training seeds")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lesionflow-video-exp")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    params = load_params(args.size, args.overrides)
    mixin(params, args.work, args.epochs, args.seeds)


if __name__ == "__main__":
    main()
