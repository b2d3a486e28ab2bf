"""Evaluate step: candidate and current champion on the same held-out split.

Metrics are measured at each image's own (canonical) resolution, not at the model's input size,
so numbers stay comparable between models trained at different resolutions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.data.manifest import Record, read_manifest
from lesionflow.data.transforms import load_image, load_mask
from lesionflow.errors import RegistryError
from lesionflow.metrics import aggregate, image_metrics
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model
from lesionflow.training import labelled

REPORT_FILE = "evaluation.json"


@dataclass
class ModelScore:
    table: dict[str, dict[str, float]]
    fps: float

    def overall(self, metric: str) -> float:
        return self.table["overall"][metric]


@dataclass
class Evaluation:
    split: str
    candidate: ModelScore
    champion: ModelScore | None
    champion_version: str | None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Evaluation:
        raw = json.loads(path.read_text())
        score = lambda s: ModelScore(**s) if s else None
        return cls(raw["split"], score(raw["candidate"]), score(raw["champion"]), raw["champion_version"])


def score_model(model: Segmenter | LesionTypeRouter, dataset_dir: Path, records: list[Record],
                threshold: float, overlays: int = 0, prefix: str = "") -> ModelScore:
    """Per-image metrics aggregated per lesion type; frames/s measured one frame at a time, as a
    real-time video stream would arrive (pre- and post-processing included)."""
    rows = []
    start = time.perf_counter()
    for i, record in enumerate(records):
        image = load_image(dataset_dir, record)
        prob = model.predict_proba([image], lesion_types=[record.lesion_type])[0]
        pred, truth = prob > threshold, load_mask(dataset_dir, record)
        rows.append({**image_metrics(pred, truth), "lesion_type": record.lesion_type})
        if i < overlays:
            mlflow.log_image(overlay_strip(image, truth, pred), f"{prefix}overlays/{record.id}.png")
    fps = len(records) / (time.perf_counter() - start)
    return ModelScore(aggregate(rows), fps)


def overlay_strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Image | truth (green) | prediction (red), side by side, for reviewers in the MLflow UI."""
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(
        image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)

    def tint(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        out = rgb.astype(np.float32)
        out[mask] = 0.55 * out[mask] + 0.45 * np.array(colour, dtype=np.float32)
        return out.astype(np.uint8)

    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, tint(truth, (0, 255, 0)), gap, tint(pred, (255, 0, 0))], axis=1)


def select(records: list[Record], split: str) -> list[Record]:
    """Labelled records of one split, or of every split with ``split="all"`` (cross-dataset use)."""
    if split == "all":
        return [r for s in ("train", "val", "test") for r in labelled(records, s)]
    return labelled(records, split)


def evaluate(params: Params, dataset_dir: Path, model_dir: Path, out_dir: Path,
             split: str = "test") -> Evaluation:
    """Score the candidate (and the champion, if any) on ``split``; log tables and overlays."""
    records = select(read_manifest(dataset_dir), split)
    if not records:
        raise ValueError(f"no labelled records in the {split!r} split of {dataset_dir}")
    cfg = params.evaluate
    candidate = score_model(load_model(model_dir), dataset_dir, records, cfg.threshold,
                            overlays=cfg.n_overlays)
    champion_version = registry.champion_version(params.runtime.model_name)
    champion = None
    if champion_version is not None:
        try:
            champion_model = registry.load_model(params.runtime.model_name, champion_version)
        except RegistryError as err:
            raise RegistryError(
                f"champion v{champion_version} could not be loaded for comparison: {err}") from err
        champion = score_model(champion_model, dataset_dir, records, cfg.threshold)
    result = Evaluation(split, candidate, champion, champion_version)

    for name, row in candidate.table.items():
        mlflow.log_metrics({f"{split}.{name}.{k}": v for k, v in row.items() if np.isfinite(v)})
    mlflow.log_metric("fps", candidate.fps)
    mlflow.log_table({"lesion_type": list(candidate.table),
                      **{k: [row[k] for row in candidate.table.values()]
                         for k in ("n", "dice", "iou", "hd95", "hd95_undefined", "false_positive_rate")}},
                     "per_type_metrics.json")
    if champion is not None:
        mlflow.log_metrics({f"champion.{split}.overall.{k}": v
                            for k, v in champion.table["overall"].items() if np.isfinite(v)})
        mlflow.set_tag("lesionflow.compared_with_champion", champion_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.save(out_dir / REPORT_FILE)
    mlflow.log_artifact(str(out_dir / REPORT_FILE))
    return result
