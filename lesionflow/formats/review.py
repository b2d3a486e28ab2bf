"""The reviewers' round trip: a review batch out to a tool, the tool's export back as corrections.

``export_batch`` writes what a tool imports (and reads it back, comparing every mask with the
prediction, like ``lesionflow export``); ``read_corrections`` turns what the tool exports into the
ingest layout ``corrections.add`` validates. The tools: ``label-studio`` (``labelstudio.py``),
``cvat`` (CVAT for images 1.1 XML, ``cvat.py``) and ``coco`` (lesionflow's COCO writer; CVAT's
"COCO 1.0" export reads back too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionflow.data.manifest import check_fresh
from lesionflow.errors import AnnotationFormatError, ExportError
from lesionflow.export import Item, read_coco, write_coco
from lesionflow.formats import cvat, labelstudio
from lesionflow.formats.batch import (
    Correction,
    ReviewBatch,
    read_batch,
    read_sidecar,
    start_export,
    to_corrections_folder,
)

TOOLS = ("label-studio", "cvat", "coco")


@dataclass(frozen=True)
class ReviewExport:
    format: str
    out_dir: Path
    images: int

    def summary(self) -> str:
        return (f"exported {self.images} images with their predictions as {self.format} to "
                f"{self.out_dir} (read back and verified)")


def export_batch(batch_dir: Path, fmt: str, out: Path) -> ReviewExport:
    """Write the batch in ``batch_dir`` for ``fmt`` into the fresh folder ``out``."""
    if fmt not in TOOLS:
        raise ExportError(f"review export format {fmt!r} is not one of {', '.join(TOOLS)}")
    out = Path(out)
    try:
        check_fresh(out)
    except FileExistsError as err:
        raise ExportError(f"{err}: name a new --out folder") from None
    batch = read_batch(Path(batch_dir))
    if fmt == "label-studio":
        labelstudio.write_tasks(batch, out)
        back = _ls_predictions(out, batch)
    elif fmt == "cvat":
        cvat.write_task(batch, out)
        back = {c.id: c.mask for c in cvat.read_export(out)}
    else:
        write_coco([Item(i.id, i.image, *i.size(), i.label, i.mask(), score=i.score)
                    for i in batch.items], out)
        start_export(batch, out, images=False)
        back = {k: mask for k, (_, mask) in read_coco(out).items()}
    for item in batch.items:
        if item.id not in back or not np.array_equal(back[item.id], item.mask()):
            raise ExportError(f"{fmt} export of {item.id} does not read back as its prediction")
    return ReviewExport(fmt, out, len(batch.items))


def _ls_predictions(out: Path, batch: ReviewBatch) -> dict[str, np.ndarray]:
    """The pre-annotations of the written tasks, decoded as Label Studio would."""
    masks = {}
    for task, item in zip(json.loads((out / labelstudio.TASKS).read_text()), batch.items):
        mask = np.zeros(item.size(), bool)
        for r in task["predictions"][0]["result"]:
            mask |= labelstudio.decode(r["value"]["rle"], *mask.shape, item.id)
        masks[task["data"]["lesionflow_id"]] = mask
    return masks


def read_coco_export(root: Path) -> list[Correction]:
    """lesionflow's ``annotations.json`` or CVAT's ``annotations/instances_<subset>.json``;
    images under ``images/`` (CVAT may put them in a folder per subset)."""
    found = [p for p in [root / "annotations.json", *sorted(root.glob("annotations/instances_*.json"))]
             if p.is_file()]
    if len(found) != 1:
        raise AnnotationFormatError(
            f"{root} holds {len(found)} COCO annotation files ({', '.join(p.name for p in found) or 'none'}): "
            "expected annotations.json or one annotations/instances_<subset>.json")
    path = found[0]
    try:
        read = read_coco(root, str(path.relative_to(root)))
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, IndexError, ExportError) as err:
        raise AnnotationFormatError(f"{path} is not a readable COCO file ({type(err).__name__}: "
                                    f"{err})") from None
    files = {img.get("lesionflow_id") or Path(img["file_name"]).stem: Path(img["file_name"]).name
             for img in doc["images"]}  # the ids read_coco gives
    corrections = []
    for record_id, (lesion_type, mask) in read.items():
        image = next((p for p in [root / "images" / files[record_id],
                                  *sorted((root / "images").glob(f"*/{files[record_id]}"))]
                      if p.is_file()), None)
        if image is None:
            raise AnnotationFormatError(f"{path.name} image {files[record_id]!r}: its file is not "
                                        f"under {root / 'images'}")
        corrections.append(Correction(record_id, image, mask, lesion_type))
    return corrections


READERS = {"label-studio": labelstudio.read_export, "cvat": cvat.read_export, "coco": read_coco_export}


def read_corrections(fmt: str, root: Path, out: Path) -> Path:
    """The tool export in ``root`` as an ingest-layout corrections batch in ``out`` (returned)."""
    if fmt not in READERS:
        raise AnnotationFormatError(f"corrections format {fmt!r} is not one of folder, "
                                    f"{', '.join(READERS)}")
    root = Path(root)
    batch: ReviewBatch | None = read_sidecar(root)
    to_corrections_folder(READERS[fmt](root), batch, out)
    return out
