"""The pseudo_label step's hook: train ``weak`` records (image + area ratio) become
``pseudo_label`` records whose masks are the GCN's second annotation.

The weak model starts from the labelling champion when it is a single ``Segmenter`` (its head
ranks the first epoch's superpixels), otherwise from scratch (the boundary prior ranks them); it
trains on the weak records together with a seeded sample of ``labelled_per_weak`` labelled train
records per weak one: full masks anchor it, and the step's cost grows with the weak records, not
with the dataset (the meta_train step trains the real model on everything afterwards). Masks are written at each image's own size with 0 / 255 / ``IGNORE_VALUE``; the
record's ``score`` is the agreement of the network's own prediction with the painted lesion
(``score_method: weak_gcn``), so the step's good/bad cut applies to weak labels too.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from lesionflow.config import Params
from lesionflow.data.manifest import IGNORE_VALUE, Record, write_png
from lesionflow.data.transforms import load_image, to_channels
from lesionflow.models.segmenter import Segmenter
from lesionflow.steps.train import new_segmenter
from lesionflow.training import SegmentationDataset, labelled
from lesionflow.weak.train import Annotation, WeakTrainingSet, fit_weak

WEAK_MODEL = "weak_model"  # artifact folder of the segmenter + GCN weights


@dataclass
class WeakLabelReport:
    n_weak: int
    initialised_from: str  # "NAME@version" or "scratch"
    vertices: dict[str, int] = field(default_factory=dict)  # final foreground/background/ignored
    ignored_pixel_share: float = 0.0
    agreement_median: float = 0.0
    best_val_dice: float | None = None
    model_uri: str = ""  # runs:/<step run>/weak_model: the segmenter + GCN that drew the masks


def to_png(target: np.ndarray, height: int, width: int) -> np.ndarray:
    """(S, S) 1 / 0 / -1 target → (H, W) uint8 mask 255 / 0 / ``IGNORE_VALUE``."""
    values = np.select([target == 1, target == 0], [255, 0], IGNORE_VALUE).astype(np.uint8)
    return np.asarray(Image.fromarray(values).resize((width, height), Image.NEAREST))


def strip(image: np.ndarray, annotation: Annotation, size: int) -> np.ndarray:
    """Image | superpixel borders | pseudo mask (lesion red, ignored yellow), at training size."""
    rgb = np.asarray(Image.fromarray(to_channels(image, 3)).resize((size, size), Image.BILINEAR))
    sp = annotation.superpixels
    borders = np.zeros(sp.shape, bool)
    borders[:, 1:] |= sp[:, 1:] != sp[:, :-1]
    borders[1:] |= sp[1:] != sp[:-1]
    edged = rgb.copy()
    edged[borders] = (255, 255, 255)
    tinted = rgb.astype(np.float32)
    for value, colour in ((1, (255, 0, 0)), (-1, (255, 220, 0))):
        sel = annotation.target == value
        tinted[sel] = 0.5 * tinted[sel] + 0.5 * np.array(colour, np.float32)
    gap = np.full((size, 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, edged, gap, tinted.astype(np.uint8)], axis=1)


def log_weak_model(state: dict) -> str:
    """Store the weights that drew the weak records' masks in the step's run; their id for lineage."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, f"{tmp}/{WEAK_MODEL}.pt")
        mlflow.log_artifact(f"{tmp}/{WEAK_MODEL}.pt", WEAK_MODEL)
    return f"runs:/{mlflow.active_run().info.run_id}/{WEAK_MODEL}"


def label_weak_records(params: Params, source_dir: Path, dataset_dir: Path, records: list[Record],
                       champion: object | None, labeller: str | None) -> tuple[list[Record], WeakLabelReport | None]:
    """Return ``records`` with every train ``weak`` record replaced by a ``pseudo_label`` one
    (mask written under ``dataset_dir``, which already holds every image and kept mask);
    ``source_dir`` supplies the fingerprint for a model trained from scratch."""
    cfg = params.weak_label
    weak = [r for r in records if r.split == "train" and r.kind == "weak"]
    if not cfg.enabled or not weak:
        return records, None
    pretrained = isinstance(champion, Segmenter)
    if not pretrained:
        print("weak labels: no single-model champion to start from, so the boundary prior ranks first; "
              "from scratch, ratios reached about half of full supervision on Kvasir-SEG, from a model "
              "trained on other masks 0.95 — register one first where you can (README, Weak labels)")
    model = copy.deepcopy(champion) if pretrained else new_segmenter(params, source_dir)
    pool = labelled(records, "train")
    rng = np.random.default_rng(params.seed)
    keep = sorted(rng.choice(len(pool), min(len(pool), round(cfg.labelled_per_weak * len(weak))), replace=False))
    data = WeakTrainingSet(dataset_dir, [pool[i] for i in keep], weak, model, cfg.default_error,
                           augment=params.train.augment, seed=params.seed)
    val_records = labelled(records, "val")
    val = SegmentationDataset(dataset_dir, val_records, model) if val_records else None

    def log_epoch(row: dict) -> None:
        mlflow.log_metrics({f"weak/{k}": v for k, v in row.items() if isinstance(v, float | int)},
                           step=row["epoch"])

    result = fit_weak(model, data, cfg, params.train, seed=params.seed, val=val, pretrained=pretrained,
                      on_epoch=log_epoch)
    model_uri = log_weak_model(result.state)
    by_id: dict[str, Record] = {}
    for i, (record, annotation) in enumerate(zip(weak, result.annotations, strict=True)):
        mask_rel = f"masks/{record.id}.png"
        sha = write_png(to_png(annotation.target, record.height, record.width), dataset_dir / mask_rel)
        by_id[record.id] = record.model_copy(update={
            "kind": "pseudo_label", "mask": mask_rel, "mask_sha256": sha,
            "score": round(annotation.agreement, 6), "score_method": "weak_gcn",
            "labelled_by": model_uri})
        if i < cfg.n_logged:
            mlflow.log_image(strip(load_image(dataset_dir, record), annotation, model.image_size),
                             f"weak_labels/{record.id}.png")
    report = WeakLabelReport(
        n_weak=len(weak), initialised_from=labeller if pretrained else "scratch",
        vertices={k: sum(a.counts[k] for a in result.annotations) for k in result.annotations[0].counts},
        ignored_pixel_share=float(np.mean([(a.target == -1).mean() for a in result.annotations])),
        agreement_median=float(np.median([a.agreement for a in result.annotations])),
        best_val_dice=result.best_val_dice, model_uri=model_uri)
    mlflow.log_metrics({"weak/n_weak": report.n_weak, "weak/agreement_median": report.agreement_median,
                        "weak/final_ignored_pixel_share": report.ignored_pixel_share,
                        **{f"weak/final_{k}_vertices": v for k, v in report.vertices.items()}})
    mlflow.log_dict(asdict(report), "weak_label_report.json")
    print(f"weak labels: {report.n_weak} records pseudo-labelled by {model_uri} "
          f"(from {report.initialised_from}); vertices {report.vertices}")
    return [by_id.get(r.id, r) for r in records], report
