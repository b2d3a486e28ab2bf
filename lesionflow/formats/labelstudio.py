"""Label Studio: a review batch as tasks with brush pre-annotations, and its JSON export read back.

Masks travel as Label Studio's brush RLE (``"type": "brushlabels"``, ``"value": {"format":
"rle", "rle": [...]}``): the thi.ng rle-pack bit stream of the image's RGBA pixels, row-major, the
mask in the alpha channel. Encoding and decoding go through ``label_studio_converter.brush``, the
Label Studio team's own implementation, so a mask means the same pixels here and in the editor.

Export folder (``lesionflow review export --format label-studio``)::

    tasks.json              import it into a project with ``labeling_config.xml``; each task has
                            data.image (a local-files URL under images/), data.lesionflow_id and a
                            prediction (model_version, score, one brush result)
    labeling_config.xml     <Image name="image"> + <BrushLabels name="label"> with the batch's labels
    images/<id>.png         serve them with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<this folder>
    lesionflow_batch.json   the batch (model version that predicted)

Import: put the project's JSON export (Export → JSON) in that folder. Each task's newest
annotation that was not skipped is the reviewer's mask (the union of its brush results; none: no
lesion), ``completed_by`` the reviewer; tasks nobody annotated are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lesionflow.errors import AnnotationFormatError
from lesionflow.formats.batch import SIDECAR, Correction, ReviewBatch, start_export

TASKS = "tasks.json"
CONFIG = "labeling_config.xml"
FROM_NAME, TO_NAME = "label", "image"
URL_PREFIX = "/data/local-files/?d="  # Label Studio's local files storage, relative to its root


def _brush():
    # imported on use: the package pulls in nltk and scikit-learn (~5 s) through its __init__
    from label_studio_converter import brush

    return brush


def encode(mask: np.ndarray) -> list[int]:
    """A bool HxW mask as Label Studio brush RLE (alpha 255 where lesion, every channel alike)."""
    return _brush().mask2rle(mask.astype(np.uint8) * 255)


def decode(rle: list[int], height: int, width: int, where: str) -> np.ndarray:
    """Brush RLE → bool HxW: alpha at least half opaque is lesion (strokes are drawn on a canvas,
    whose anti-aliased edges leave faint alpha)."""
    try:
        flat = _brush().decode_rle(bytes(rle))
    except (ValueError, TypeError, IndexError) as err:
        raise AnnotationFormatError(f"{where}: the brush RLE does not decode ({err})") from None
    if flat.size != height * width * 4:
        raise AnnotationFormatError(f"{where}: the brush RLE holds {flat.size} values, not "
                                    f"{height}x{width}x4 (original_height x original_width x RGBA)")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def _result(mask: np.ndarray, label: str, region_id: str) -> dict:
    height, width = mask.shape
    return {"id": region_id, "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode(mask), "brushlabels": [label]}}


def write_tasks(batch: ReviewBatch, out: Path) -> int:
    """The batch as Label Studio tasks with the predictions as pre-annotations; returns the count."""
    start_export(batch, out)
    tasks = []
    for item in batch.items:
        mask = item.mask()
        result = [_result(mask, item.label, f"{item.id}-prediction")] if mask.any() else []
        tasks.append({
            "data": {"image": f"{URL_PREFIX}images/{item.id}.png", "lesionflow_id": item.id,
                     "lesion_type": item.lesion_type, "source": item.source, "score": item.score},
            "predictions": [{"model_version": batch.model_version, "score": item.score,
                             "result": result}]})
    (out / TASKS).write_text(json.dumps(tasks))
    labels = "\n".join(f'    <Label value="{label}"/>' for label in batch.labels())
    (out / CONFIG).write_text(
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n'
        "</View>\n")
    return len(tasks)


def export_file(root: Path) -> Path:
    """The one Label Studio JSON export in ``root`` (any ``*.json`` but the tasks and sidecar)."""
    found = sorted(p for p in root.glob("*.json") if p.name not in (TASKS, SIDECAR))
    if len(found) != 1:
        raise AnnotationFormatError(
            f"{root} holds {len(found)} Label Studio exports ({', '.join(p.name for p in found) or 'none'}): "
            f"put exactly one project JSON export (Export → JSON) next to {TASKS}")
    return found[0]


def _reviewer(completed_by) -> str | None:
    """``completed_by`` is a user id in current exports and a user object in older ones."""
    if isinstance(completed_by, dict):
        return completed_by.get("email") or completed_by.get("username") or (
            f"label-studio-user-{completed_by['id']}" if "id" in completed_by else None)
    return None if completed_by is None else f"label-studio-user-{completed_by}"


def _annotation(task: dict) -> dict | None:
    """The newest annotation that was not skipped (None: nobody reviewed the task)."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: a.get("updated_at") or a.get("created_at") or "") if done else None


def read_export(root: Path) -> list[Correction]:
    """Every reviewed task of the JSON export in ``root`` as a correction."""
    path = export_file(root)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AnnotationFormatError(f"{path} is not JSON: {err}") from None
    if not isinstance(tasks, list):
        raise AnnotationFormatError(f"{path} is not a Label Studio JSON export (a list of tasks)")
    corrections = []
    for n, task in enumerate(tasks):
        where = f"{path.name} task {task.get('id', n) if isinstance(task, dict) else n}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise AnnotationFormatError(f"{where} has no data")
        annotation = _annotation(task)
        if annotation is None:
            continue
        record_id = task["data"].get("lesionflow_id")
        if not record_id:
            raise AnnotationFormatError(f"{where} has no data.lesionflow_id: import the tasks.json "
                                        "that `lesionflow review export` wrote")
        image = root / "images" / f"{record_id}.png"
        if not image.is_file():
            raise AnnotationFormatError(f"{where}: its image {image} is missing")
        mask, labels = None, set()
        for k, result in enumerate(annotation.get("result") or []):
            if result.get("type") != "brushlabels":
                raise AnnotationFormatError(f"{where} result {k} is a {result.get('type')!r}: only "
                                            "brushlabels regions outline a lesion")
            try:
                value, height, width = (result["value"], int(result["original_height"]),
                                        int(result["original_width"]))
                rle = value["rle"]
            except (KeyError, TypeError, ValueError) as err:
                raise AnnotationFormatError(f"{where} result {k} lacks {err}") from None
            region = decode(rle, height, width, f"{where} result {k}")
            mask = region if mask is None else _same_size(mask, region, where) | region
            labels.update(value.get("brushlabels") or [])
        if len(labels) > 1:
            raise AnnotationFormatError(f"{where} has regions of {sorted(labels)}: one lesion type "
                                        "per image")
        if mask is None:  # every region deleted: the reviewer says there is no lesion
            with Image.open(image) as img:
                mask = np.zeros((img.height, img.width), bool)
        corrections.append(Correction(str(record_id), image, mask, next(iter(labels), None),
                                      _reviewer(annotation.get("completed_by"))))
    return corrections


def _same_size(a: np.ndarray, b: np.ndarray, where: str) -> np.ndarray:
    if a.shape != b.shape:
        raise AnnotationFormatError(f"{where}: regions of sizes {a.shape} and {b.shape}")
    return a
