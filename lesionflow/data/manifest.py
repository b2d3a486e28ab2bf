"""The canonical dataset layout, shared by every step that reads or writes data.

A dataset is a directory::

    manifest.jsonl     one Record per line, sorted by id (deterministic: same input, same DVC hash)
    fingerprint.json   sizes, intensities, lesion areas, counts per type (see ``fingerprint.py``)
    images/<id>.png    8-bit RGB or grayscale
    masks/<id>.png     8-bit, 0 = background, 255 = lesion (absent for unlabelled/weak records)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.jsonl"
FINGERPRINT = "fingerprint.json"

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


def write_manifest(dataset_dir: Path, records: list[Record]) -> None:
    lines = [r.model_dump_json() for r in sorted(records, key=lambda r: r.id)]
    (dataset_dir / MANIFEST).write_text("\n".join(lines) + "\n")


def read_manifest(dataset_dir: str | Path) -> list[Record]:
    path = Path(dataset_dir) / MANIFEST
    return [Record.model_validate_json(line) for line in path.read_text().splitlines() if line]


def read_fingerprint(dataset_dir: str | Path) -> dict:
    return json.loads((Path(dataset_dir) / FINGERPRINT).read_text())
