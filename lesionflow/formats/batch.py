"""A review batch as ``lesionflow review next`` writes it, and the folder layout shared by every
reviewer tool's round trip.

The batch::

    batch.json          {"strategy", "model_version", "created", "items": [{"id", "image":
                         "images/<id>.png", "prediction": "predictions/<id>.png" (0/255 PNG),
                         "lesion_type": str | null, "score", "source"}]}

``lesionflow review export`` turns it into one folder per tool (tasks for Label Studio, a CVAT
task, COCO), always with ``images/<id>.png`` and ``lesionflow_batch.json`` (this batch's
``batch.json``, so the model version that predicted stays with the images). The reviewer drops the
tool's export into that folder; ``corrections add --format`` reads it back through
``to_corrections_folder``: the ingest layout (``images/``, ``masks/``, ``corrections.csv``) that
``corrections.add`` validates exactly like a hand-made batch.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lesionflow.data.manifest import link_or_copy, write_png
from lesionflow.errors import AnnotationFormatError

BATCH = "batch.json"
SIDECAR = "lesionflow_batch.json"  # the batch's batch.json, kept next to a tool export
GENERIC_LABEL = "lesion"  # the tool label of items whose lesion type the batch does not know


@dataclass(frozen=True)
class BatchItem:
    id: str
    image: Path
    prediction: Path
    lesion_type: str | None
    score: float
    source: str

    @property
    def label(self) -> str:
        """The label the tools show: the lesion type, or the generic one when it is unknown."""
        return self.lesion_type or GENERIC_LABEL

    def mask(self) -> np.ndarray:
        """The prediction as a bool HxW array."""
        return np.asarray(Image.open(self.prediction).convert("L")) > 127

    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        with Image.open(self.image) as img:
            return img.height, img.width


@dataclass(frozen=True)
class ReviewBatch:
    root: Path
    strategy: str
    model_version: str
    created: str
    items: list[BatchItem]

    def labels(self) -> list[str]:
        return sorted({i.label for i in self.items})


def read_batch(root: Path, name: str = BATCH) -> ReviewBatch:
    """Read and check a batch folder: every listed image and prediction exists, ids are unique."""
    root = Path(root)
    path = root / name
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        items = [BatchItem(str(i["id"]), root / i["image"], root / i["prediction"],
                           i.get("lesion_type") or None, float(i.get("score") or 0.0),
                           str(i.get("source") or "")) for i in doc["items"]]
        batch = ReviewBatch(root, str(doc.get("strategy") or ""), str(doc["model_version"]),
                            str(doc.get("created") or ""), items)
    except FileNotFoundError:
        raise AnnotationFormatError(f"{path} not found: a review batch folder is what `lesionflow "
                                    "review next --out` wrote") from None
    except (ValueError, KeyError, TypeError) as err:
        raise AnnotationFormatError(f"{path} is not a review batch ({type(err).__name__}: {err}): "
                                    "it needs model_version and items with id, image, prediction"
                                    ) from None
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise AnnotationFormatError(f"{path} lists an id twice")
    missing = [str(p) for i in items for p in (i.image, i.prediction) if not p.is_file()]
    if missing:
        raise AnnotationFormatError(f"{path} names files that do not exist: {', '.join(missing[:3])}")
    return batch


def read_sidecar(root: Path) -> ReviewBatch | None:
    """The batch a tool export folder came from, or None when the folder has no sidecar."""
    return read_batch(root, SIDECAR) if (Path(root) / SIDECAR).is_file() else None


def start_export(batch: ReviewBatch, out: Path, *, images: bool = True) -> None:
    """What every tool folder holds: the images under ``images/<id>.png`` (unless the tool's
    writer copies them) and the batch itself (sidecar and predictions), so it reads as one."""
    for item in batch.items:
        if images:
            link_or_copy(item.image, out / "images" / f"{item.id}.png")
        link_or_copy(item.prediction, out / item.prediction.relative_to(batch.root))
    link_or_copy(batch.root / BATCH, out / SIDECAR)


@dataclass(frozen=True)
class Correction:
    """One reviewed image read back from a tool: its id, the image file, the edited mask and what
    the tool says about it (None: the batch's value or ``corrections add``'s default applies)."""

    id: str
    image: Path
    mask: np.ndarray
    lesion_type: str | None = None
    reviewer: str | None = None


def to_corrections_folder(corrections: list[Correction], batch: ReviewBatch | None, out: Path) -> None:
    """Write the corrections in the ingest layout ``corrections.add`` validates: images linked,
    masks as 0/255 PNGs, ``corrections.csv`` with lesion type, model version and reviewer."""
    if not corrections:
        raise AnnotationFormatError("the export holds no reviewed image: nothing to add")
    known = {i.id: i for i in batch.items} if batch is not None else {}
    ids = [c.id for c in corrections]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise AnnotationFormatError(f"the export reviews {', '.join(twice[:5])} more than once")
    (out / "masks").mkdir(parents=True)
    rows = []
    for c in corrections:
        item = known.get(c.id)
        if batch is not None and item is None:
            raise AnnotationFormatError(f"image {c.id!r} of the export is not in the review batch "
                                        f"{batch.root / SIDECAR}")
        link_or_copy(c.image, out / "images" / f"{c.id}{c.image.suffix}")
        write_png(c.mask.astype(np.uint8) * 255, out / "masks" / f"{c.id}.png")
        label = c.lesion_type if c.lesion_type != GENERIC_LABEL else None
        rows.append([c.id, label or (item.lesion_type if item else None) or "",
                     batch.model_version if batch is not None else "", c.reviewer or ""])
    with open(out / "corrections.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "lesion_type", "model_version", "reviewer"])
        writer.writerows(rows)
