"""The nnU-Net v2 raw dataset layout, written by ``lesionflow export --format nnunet`` and
recognised as an ingest source.

    dataset.json    {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0,
                     "<lesion type>": 1, ...}, "numTraining": N, "file_ending": ".png"}
    imagesTr/<case>_0000.png    labelsTr/<case>.png     labelled train/val records
    imagesTs/<case>_0000.png   (labelsTs/<case>.png)    test records (labelled) and unlabelled ones

as nnU-Net's ``documentation/dataset_format.md`` describes it: one file per input channel except
RGB natural images (one ``_0000.png``, as in its Dataset120_RoadSegmentation example), labels as
consecutive integers with background 0. Here each lesion type is one label, and a case's label
map holds one lesion type (lesionflow types images, not pixels). The test split goes to
``imagesTs``, which nnU-Net never trains on, so a comparison on it stays fair.

As an ingest source (a folder holding ``dataset.json`` and ``imagesTr/``), each case becomes a
record named by its case identifier, typed by its label, through the same ingestion as any folder:
``imagesTr`` and ``imagesTs`` images, ``labelsTr``/``labelsTs`` masks; any ``file_ending`` ingest
reads (``.png``, ``.nii.gz``, ``.nrrd`` ...).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lesionflow.config import IngestConfig, MetadataColumns
from lesionflow.data.io import IMAGE_EXTS, LOSSY_EXTS, VOLUME_EXTS, read_volume
from lesionflow.errors import AnnotationFormatError

if TYPE_CHECKING:
    from lesionflow.export import Item

DATASET_JSON = "dataset.json"
CASES_CSV = "nnunet_cases.csv"  # written into the ingest view: case id → lesion type
RGB = {"0": "R", "1": "G", "2": "B"}


def write(items: list[Item], out: Path) -> None:
    """Write ``items`` in the raw layout."""
    types = sorted({i.lesion_type for i in items})
    labels = {"background": 0, **{t: k for k, t in enumerate(types, start=1)}}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_train = 0
    for item in items:
        train = item.mask is not None and item.split != "test"
        Image.open(item.image).convert("RGB").save(
            out / ("imagesTr" if train else "imagesTs") / f"{item.id}_0000.png")
        if item.mask is not None:
            label = item.mask.astype(np.uint8) * labels[item.lesion_type]
            Image.fromarray(label).save(out / ("labelsTr" if train else "labelsTs") / f"{item.id}.png")
        n_train += train
    (out / DATASET_JSON).write_text(json.dumps(
        {"channel_names": RGB, "labels": labels, "numTraining": n_train, "file_ending": ".png",
         "name": "lesionflow", "description": "exported by lesionflow: labelsTs holds the test "
         "split's labels (nnU-Net does not read them)"}, indent=2) + "\n")


def read(out: Path) -> dict[str, tuple[str | None, np.ndarray | None]]:
    """{case: (lesion type, bool mask)}; an unlabelled imagesTs case reads as (None, None)."""
    out = Path(out)
    meta = _dataset_json(out)
    names = _label_names(meta, out / DATASET_JSON)
    cases = {}
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for case, _ in _cases(out / images, meta["file_ending"]):
            path = out / labels / f"{case}{meta['file_ending']}"
            if not path.is_file():
                cases[case] = (None, None)
                continue
            values = np.asarray(Image.open(path))
            cases[case] = (_case_type(values, names, path), values > 0)
    return cases


def _dataset_json(root: Path) -> dict:
    path = root / DATASET_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AnnotationFormatError(f"{path} is not readable JSON: {err}") from None
    missing = [k for k in ("labels", "file_ending") if k not in meta]
    if missing:
        raise AnnotationFormatError(f"{path} lacks {missing}: an nnU-Net v2 dataset.json has "
                                    "channel_names, labels, numTraining and file_ending")
    ending = meta["file_ending"]
    if ending not in IMAGE_EXTS + VOLUME_EXTS or ending in LOSSY_EXTS:
        raise AnnotationFormatError(f"{path}: file_ending {ending!r} is not a lossless format "
                                    f"ingest reads ({', '.join(e for e in IMAGE_EXTS + VOLUME_EXTS if e not in LOSSY_EXTS)})")
    return meta


def _label_names(meta: dict, where: Path) -> dict[int, str]:
    """Label value → name, from v2's {name: value} (v1's {"0": name} is read too)."""
    labels = meta["labels"]
    try:
        if all(str(k).isdigit() for k in labels):
            names = {int(k): str(v) for k, v in labels.items()}
        else:
            names = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise AnnotationFormatError(f"{where}: labels {labels} are not name → integer (region-based "
                                    "labels are not lesion types)") from None
    if names.get(0) is None or sorted(names) != list(range(len(names))):
        raise AnnotationFormatError(f"{where}: labels {labels} must be consecutive integers from 0 "
                                    "(background)")
    return names


def _cases(folder: Path, ending: str) -> list[tuple[str, Path]]:
    """(case, file) of every ``<case>_0000<ending>``; another channel is a named error."""
    if not folder.is_dir():
        return []
    cases = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        m = re.fullmatch(r"(.+)_(\d{4})", path.name[: -len(ending)])
        if m is None:
            raise AnnotationFormatError(f"{path} is not named <case>_<4-digit channel>{ending}")
        if m.group(2) != "0000":
            raise AnnotationFormatError(
                f"{path} is input channel {m.group(2)}: lesionflow reads one image per case (an "
                "RGB PNG is one); merge the channels into one file first")
        cases.append((m.group(1), path))
    return cases


def _case_type(values: np.ndarray, names: dict[int, str], path: Path) -> str | None:
    found = sorted(int(v) for v in np.unique(values) if v)
    unknown = [v for v in found if v not in names]
    if unknown:
        raise AnnotationFormatError(f"{path} holds label values {unknown} that dataset.json's labels "
                                    "do not name")
    if len(found) > 1:
        raise AnnotationFormatError(f"{path} holds labels {[names[v] for v in found]}: one lesion "
                                    "type per case")
    return names[found[0]] if found else None


def is_raw_dataset(root: Path, cfg: IngestConfig) -> bool:
    return ((root / DATASET_JSON).is_file() and (root / "imagesTr").is_dir()
            and not (root / cfg.images_dir).is_dir())


def as_ingest_source(root: Path, cfg: IngestConfig, view: Path) -> tuple[Path, IngestConfig]:
    """An nnU-Net raw dataset as a folder ingest reads: links ``images/<case>``, ``masks/<case>``
    and a CSV of lesion types in ``view``; any other source comes back unchanged."""
    if not is_raw_dataset(root, cfg):
        return root, cfg
    meta = _dataset_json(root)
    ending = meta["file_ending"]
    names = _label_names(meta, root / DATASET_JSON)
    only = names[1] if len(names) == 2 else None  # one lesion type: no label file need be read
    rows, owner = [], {}
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for case, image in _cases(root / images, ending):
            if case in owner:
                raise AnnotationFormatError(f"case {case!r} is in both {owner[case]} and {images}")
            owner[case] = images
            _link(image, view / "images" / f"{case}{ending}")
            label = root / labels / f"{case}{ending}"
            if label.is_file():
                _link(label, view / "masks" / f"{case}{ending}")
                rows.append([case, only or _case_type(_label_values(label), names, label) or ""])
            elif images == "imagesTr":
                raise AnnotationFormatError(f"training case {case!r} has no {labels}/{case}{ending}")
        orphans = sorted(p.name for p in (root / labels).glob(f"*{ending}")
                         if p.name[: -len(ending)] not in owner) if (root / labels).is_dir() else []
        if orphans:
            raise AnnotationFormatError(f"{labels}/{orphans[0]} has no image {images}/"
                                        f"{orphans[0][: -len(ending)]}_0000{ending}")
    if not owner:
        raise AnnotationFormatError(f"{root}/imagesTr holds no <case>_0000{ending} file")
    with open(view / CASES_CSV, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "lesion_type"], *rows])
    return view, cfg.model_copy(update={
        "images_dir": "images", "masks_dir": "masks", "mask_suffix": "", "folder_fields": [],
        "metadata_csv": CASES_CSV, "columns": MetadataColumns(id="id", lesion_type="lesion_type")})


def _label_values(path: Path) -> np.ndarray:
    if any(path.name.endswith(e) for e in VOLUME_EXTS):
        return read_volume(path)[0]
    return np.asarray(Image.open(path))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())
