"""The canonical dataset layout, shared by every step that reads or writes data.

A dataset is a directory::

    manifest.jsonl     one Record per line, sorted by id (deterministic: same input, same DVC hash)
    fingerprint.json   sizes, intensities, lesion areas, counts per type (see ``fingerprint.py``)
    images/<id>.png    8-bit RGB or grayscale
    masks/<id>.png     8-bit, 0 = background, 255 = lesion (absent for unlabelled/weak records)
    images/<video>/<id>.png, masks/<video>/<id>.png   video frames: one folder per video,
                       128 = ignore (``IGNORE_VALUE``: only in pseudo-labels from area ratios, where
                       the pixels of vertices ranked between the r-e and r+e bounds are unlabelled)

Readers turn a mask into a training target with ``transforms.load_target``: 1 lesion, 0
background, -1 ignore; the losses and validation Dice skip the -1 pixels. ``load_mask`` (truth
for metrics) counts only lesion pixels. Masks written before the ignore value existed hold only 0
and 255, so old datasets read unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lesionflow.errors import DatasetError

MANIFEST = "manifest.jsonl"
FINGERPRINT = "fingerprint.json"
IGNORE_VALUE = 128  # mask PNG value of pixels the loss must skip (see the module docstring)

Kind = Literal[
    "still",  # image + mask
    "video_frame",  # one frame of a video; mask optional (key frames have one)
    "weak",  # image + lesion area ratio, no mask
    "unlabelled",  # image only
    "correction",  # reviewer-corrected mask for a model's prediction
    "pseudo_label",  # mask predicted by a model
    "synthetic_video",  # frame generated from a still
]
Split = Literal["train", "val", "test"]
# kinds whose mask a person drew: never judged by a model, never "bad" task data
TRUSTED_KINDS = frozenset({"still", "video_frame", "correction"})


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Kind
    image: str
    mask: str | None = None
    image_sha256: str
    mask_sha256: str | None = None
    height: int
    width: int
    channels: int
    lesion_type: str
    group: str = Field(description="patient or video id; splits never cut a group")
    split: Split
    frame_index: int | None = None
    key_frame: bool = False
    area_ratio: float | None = Field(None, ge=0, le=1)
    area_error: float | None = Field(None, ge=0, le=1)
    source: str = Field(description="path of the original file, relative to the source root")
    # set by pseudo_label: how good the labelling model's mask is, and how that was judged
    score: float | None = None
    score_method: Literal["tta", "dice", "weak_gcn"] | None = None  # weak_gcn: lesionflow.weak
    quality: Literal["good", "bad"] | None = None
    # provenance of the mask: annotator:<who> (ground truth), reviewer:<who> (corrections),
    # <model>@<version> (the labelling champion), runs:/<id>/video_model|weak_model (G, the GCN)
    labelled_by: str | None = Field(None, description="who or which model version drew the mask")
    corrected_from: str | None = Field(
        None, description="corrections: model version whose prediction the reviewer corrected")
    spacing: tuple[float, float] | None = Field(
        None, description="pixel size (row, column) in mm of the stored image, where the source says")


def is_bad(record: Record) -> bool:
    """A model-made mask the pseudo_label step judged bad (ground truth and corrections never are)."""
    return record.quality == "bad" and record.kind not in TRUSTED_KINDS


def check_fresh(out_dir: Path) -> None:
    """Datasets are immutable once written: refuse to write into a non-empty folder."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder {out_dir} already exists and is not empty; "
                              "datasets are only written fresh")


@contextmanager
def staged_dataset(out_dir: Path) -> Iterator[Path]:
    """Yield a temp sibling of ``out_dir`` to write into; rename it into place only if the block
    succeeds, so ``out_dir`` holds a complete dataset or nothing (never a half-written one)."""
    out_dir = Path(out_dir)
    check_fresh(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        yield tmp
        check_fresh(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link a dataset file (datasets are immutable, so sharing inodes is safe and free);
    copy where links are impossible (another filesystem, or not permitted)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)  # video frames live in a folder per video
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_files(record: Record, src: Path, dst: Path) -> None:
    """Link a record's image and mask (where it has one) from dataset ``src`` into ``dst``."""
    for rel in (record.image, record.mask):
        if rel is not None:
            link_or_copy(src / rel, dst / rel)


def write_png(array: np.ndarray, path: Path) -> str:
    """Write an 8-bit PNG and return the sha256 of its bytes (the manifest's file hash)."""
    buf = io.BytesIO()
    # zlib level 1: ~3x faster than the default 6 for ~15% larger files; encoding dominates ingest
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(dataset_dir: Path, records: list[Record]) -> None:
    lines = [r.model_dump_json(exclude_none=True) for r in sorted(records, key=lambda r: r.id)]
    (dataset_dir / MANIFEST).write_text("\n".join(lines) + "\n")


def read_manifest(dataset_dir: str | Path) -> list[Record]:
    path = Path(dataset_dir) / MANIFEST
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = "is missing" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
        raise DatasetError(f"{dataset_dir} is not a canonical dataset: its {MANIFEST} {reason}; "
                           "name a folder `lesionflow ingest --out` wrote") from None
    try:
        return [Record.model_validate_json(line) for line in lines if line]
    except ValidationError as err:
        raise DatasetError(f"{path} is malformed ({err.error_count()} problem(s), first: "
                           f"{err.errors()[0]['msg']}); rebuild the dataset with `lesionflow ingest`"
                           ) from None


def read_fingerprint(dataset_dir: str | Path) -> dict:
    return json.loads((Path(dataset_dir) / FINGERPRINT).read_text())
