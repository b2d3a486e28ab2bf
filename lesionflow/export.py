"""Export a dataset, or the server's predictions, as COCO, Pascal VOC, plain JSON or nnU-Net raw.

Every format is written, then read back (COCO through pycocotools' own ``COCO`` API) and compared
mask for mask with what was meant to be written; a mismatch is an ``ExportError``, never a file
that silently disagrees with its source. Each connected lesion region is one object (COCO
annotation, VOC object); an image without a mask (unlabelled) is listed with no objects.

``coco/``  ``annotations.json`` (images with ``lesion_type``/``split``; one category per lesion
           type; annotations with compressed RLE ``segmentation``, ``bbox``, ``area``,
           ``iscrowd: 0`` and, for predictions, ``score``) + ``images/``.
``voc/``   ``JPEGImages/`` (the images, original PNG kept), ``SegmentationClass/`` and
           ``SegmentationObject/`` (palette PNGs: class index / object index, 0 background),
           ``Annotations/<id>.xml`` (size, objects with name and 1-based bndbox),
           ``ImageSets/Segmentation/<split>.txt``, ``labels.txt`` (class index order) and
           ``labelmap.txt`` (``name:r,g,b:parts:actions`` per class, the colours of the class
           PNGs): CVAT and Datumaro read the classes from it; without it they take index 1 for
           VOC's "aeroplane".
``nnunet/`` the nnU-Net v2 raw layout (``formats/nnunet.py``): ``dataset.json``,
           ``imagesTr/<id>_0000.png``, ``labelsTr/<id>.png``; test and unlabelled in ``imagesTs``.
``json/``  ``lesions.json`` + ``images/``; the plain schema, readable with nothing but JSON::

    {"schema": "lesionflow.lesions/v1",
     "lesion_types": ["elongated", "round"],
     "items": [{"id": "...", "image": "images/<file>", "height": H, "width": W,
                "lesion_type": "round", "split": "test" | null, "score": 0.93 | null,
                "mask": null | {"size": [H, W], "counts": [background run, lesion run, ...]}}]}

    ``counts`` are run lengths over the mask in row-major order, starting with a (possibly empty)
    background run; ``score`` is the server's confidence for predictions.

Predictions come from a folder holding ``predictions.jsonl``: one ``POST /predict`` answer per
line, plus ``"id"`` and ``"image"`` (the image file, relative to that folder).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from scipy import ndimage

from lesionflow.data.manifest import check_fresh, link_or_copy, read_manifest
from lesionflow.errors import ExportError
from lesionflow.formats import nnunet
from lesionflow.models.pyfunc import decode_rle

Format = Literal["coco", "voc", "json", "nnunet"]
FORMATS: tuple[Format, ...] = ("coco", "voc", "json", "nnunet")
PREDICTIONS = "predictions.jsonl"
JSON_SCHEMA = "lesionflow.lesions/v1"


@dataclass(frozen=True)
class Item:
    """One image and its mask (None: unlabelled), the unit every format writes."""

    id: str
    image: Path
    height: int
    width: int
    lesion_type: str
    mask: np.ndarray | None
    split: str | None = None
    score: float | None = None

    @property
    def file_name(self) -> str:
        return f"{self.id}{self.image.suffix}"


@dataclass(frozen=True)
class ExportReport:
    format: Format
    out_dir: Path
    images: int
    objects: int

    def summary(self) -> str:
        return (f"exported {self.images} images, {self.objects} lesion objects as {self.format} to "
                f"{self.out_dir} (read back and verified)")


def dataset_items(dataset_dir: Path) -> list[Item]:
    """Every record of a canonical dataset (``data/manifest.py``)."""
    dataset_dir = Path(dataset_dir)
    return [Item(r.id, dataset_dir / r.image, r.height, r.width, r.lesion_type,
                 None if r.mask is None else np.asarray(Image.open(dataset_dir / r.mask)) > 0, r.split)
            for r in read_manifest(dataset_dir)]


def prediction_items(predictions_dir: Path) -> list[Item]:
    """The server's answers saved in ``predictions.jsonl`` (see the module docstring)."""
    predictions_dir = Path(predictions_dir)
    path = predictions_dir / PREDICTIONS
    if not path.is_file():
        raise ExportError(f"{path} not found: a predictions folder holds one /predict answer per "
                          'line, with "id" and "image" added')
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        answer = json.loads(line)
        missing = [k for k in ("id", "image", "mask", "height", "width") if k not in answer]
        if missing:
            raise ExportError(f"{path}:{n} lacks {missing}")
        mask = answer["mask"]
        if mask["format"] == "png":
            array = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["data"])))) > 0
        else:
            array = decode_rle(mask)
        items.append(Item(str(answer["id"]), predictions_dir / answer["image"], int(answer["height"]),
                          int(answer["width"]), answer.get("lesion_type") or "lesion", array,
                          score=answer.get("confidence")))
    return items


def lesion_regions(mask: np.ndarray | None) -> list[np.ndarray]:
    """Connected lesion regions (8-connectivity), largest first."""
    if mask is None or not mask.any():
        return []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), int))
    regions = [labels == i for i in range(1, n + 1)]
    return sorted(regions, key=lambda r: -int(r.sum()))


def _lesion_types(items: list[Item]) -> list[str]:
    return sorted({i.lesion_type for i in items})


def _copy_images(items: list[Item], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in items:
        link_or_copy(item.image, out / item.file_name)


def write_coco(items: list[Item], out_dir: Path) -> int:
    types = _lesion_types(items)
    category = {t: i for i, t in enumerate(types, start=1)}
    images, annotations = [], []
    for image_id, item in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": item.file_name, "height": item.height,
                       "width": item.width, "lesion_type": item.lesion_type, "split": item.split,
                       "lesionflow_id": item.id})
        for region in lesion_regions(item.mask):
            rle = coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))
            ann = {"id": len(annotations) + 1, "image_id": image_id,
                   "category_id": category[item.lesion_type],
                   "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                   "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                   "iscrowd": 0}
            if item.score is not None:
                ann["score"] = float(item.score)
            annotations.append(ann)
    coco = {"info": {"description": "lesionflow export"}, "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": t, "supercategory": "lesion"} for t, i in category.items()]}
    _copy_images(items, out_dir / "images")
    (out_dir / "annotations.json").write_text(json.dumps(coco))
    return len(annotations)


def read_coco(out_dir: Path, annotations: str = "annotations.json"
              ) -> dict[str, tuple[str | None, np.ndarray]]:
    """{id: (lesion type, union of its annotations' masks)}, read with pycocotools. Files other
    tools wrote (CVAT's COCO 1.0) lack lesionflow's image fields: the id is then the file name's
    stem and the lesion type the annotations' one category (None without annotations)."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        coco = COCO(str(Path(out_dir) / annotations))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        image_id = img.get("lesionflow_id") or Path(img["file_name"]).stem
        mask = np.zeros((img["height"], img["width"]), bool)
        found = set()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            mask |= coco.annToMask(ann) > 0
            found.add(names[ann["category_id"]])
        lesion_type = img.get("lesion_type") or (found.pop() if len(found) == 1 else None)
        if found - {lesion_type}:
            raise ExportError(f"image {image_id}: categories {sorted(found)} but one lesion type "
                              f"({lesion_type}) per image")
        out[image_id] = (lesion_type, mask)
    return out


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (index → RGB), as PIL wants it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _palette_png(index: np.ndarray, path: Path) -> None:
    img = Image.fromarray(index.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def write_voc(items: list[Item], out_dir: Path) -> int:
    types = _lesion_types(items)
    class_index = {t: i for i, t in enumerate(types, start=1)}
    for sub in ("Annotations", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    _copy_images(items, out_dir / "JPEGImages")
    splits: dict[str, list[str]] = {}
    n_objects = 0
    for item in items:
        regions = lesion_regions(item.mask)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "JPEGImages"
        ET.SubElement(root, "filename").text = item.file_name
        size = ET.SubElement(root, "size")
        for tag, value in (("width", item.width), ("height", item.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        ET.SubElement(root, "segmented").text = "1" if item.mask is not None else "0"
        for region in regions:
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = item.lesion_type
            for tag, value in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
                ET.SubElement(obj, tag).text = value
            ys, xs = np.nonzero(region)
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", xs.min()), ("ymin", ys.min()), ("xmax", xs.max()), ("ymax", ys.max())):
                ET.SubElement(box, tag).text = str(int(value) + 1)  # VOC boxes are 1-based
            if item.score is not None:
                ET.SubElement(obj, "score").text = f"{item.score:.6f}"
        ET.ElementTree(root).write(out_dir / "Annotations" / f"{item.id}.xml")
        if item.mask is not None:
            _palette_png(item.mask * class_index[item.lesion_type], out_dir / "SegmentationClass" / f"{item.id}.png")
            objects = np.zeros(item.mask.shape, np.uint8)
            for k, region in enumerate(regions, start=1):
                objects[region] = k
            _palette_png(objects, out_dir / "SegmentationObject" / f"{item.id}.png")
            splits.setdefault(item.split or "predictions", []).append(item.id)
        n_objects += len(regions)
    for split, ids in splits.items():
        (out_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out_dir / "labels.txt").write_text("\n".join(["background", *types]) + "\n")
    palette = voc_palette()
    (out_dir / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "".join(
        f"{name}:{','.join(map(str, palette[3 * k:3 * k + 3]))}::\n"
        for k, name in enumerate(["background", *types])))
    return n_objects


def read_voc(out_dir: Path) -> dict[str, tuple[str, np.ndarray | None]]:
    """{id: (lesion type, mask or None)} from the XML and the class PNGs."""
    out_dir = Path(out_dir)
    labels = (out_dir / "labels.txt").read_text().split()
    out = {}
    for xml in sorted((out_dir / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        png = out_dir / "SegmentationClass" / f"{xml.stem}.png"
        names = {o.findtext("name") for o in root.iter("object")}
        if root.findtext("segmented") == "0":
            out[xml.stem] = (None, None)
            continue
        index = np.asarray(Image.open(png))
        found = {labels[i] for i in np.unique(index) if i}
        if found != names:
            raise ExportError(f"{xml.name}: objects {sorted(names)} but class mask holds {sorted(found)}")
        out[xml.stem] = (found.pop() if found else None, index > 0)
    return out


def rle_rows(mask: np.ndarray) -> list[int]:
    """Row-major run lengths, starting with a background run (see the JSON schema)."""
    flat = mask.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def unrle_rows(size: list[int], counts: list[int]) -> np.ndarray:
    values = np.arange(len(counts)) % 2 == 1  # runs alternate background, lesion, ...
    return np.repeat(values, counts).reshape(size)


def write_json(items: list[Item], out_dir: Path) -> int:
    records = [{"id": i.id, "image": f"images/{i.file_name}", "height": i.height, "width": i.width,
                "lesion_type": i.lesion_type, "split": i.split, "score": i.score,
                "mask": None if i.mask is None else {"size": [i.height, i.width], "counts": rle_rows(i.mask)}}
               for i in items]
    _copy_images(items, out_dir / "images")
    (out_dir / "lesions.json").write_text(json.dumps(
        {"schema": JSON_SCHEMA, "lesion_types": _lesion_types(items), "items": records}))
    return sum(len(lesion_regions(i.mask)) for i in items)


def read_json(out_dir: Path) -> dict[str, tuple[str, np.ndarray | None]]:
    doc = json.loads((Path(out_dir) / "lesions.json").read_text())
    if doc.get("schema") != JSON_SCHEMA:
        raise ExportError(f"lesions.json schema is {doc.get('schema')!r}, expected {JSON_SCHEMA!r}")
    return {r["id"]: (r["lesion_type"], None if r["mask"] is None else unrle_rows(**r["mask"]))
            for r in doc["items"]}


def write_nnunet(items: list[Item], out_dir: Path) -> int:
    nnunet.write(items, out_dir)
    return sum(len(lesion_regions(i.mask)) for i in items)


WRITERS = {"coco": (write_coco, read_coco), "voc": (write_voc, read_voc), "json": (write_json, read_json),
           "nnunet": (write_nnunet, nnunet.read)}


def _verify(items: Iterable[Item], back: dict, fmt: Format) -> None:
    for item in items:
        lesion_type, mask = back.get(item.id, (None, None))
        expected = item.mask if item.mask is not None and item.mask.any() else None
        empty_ok = expected is None and (mask is None or not mask.any())
        if not empty_ok and (mask is None or not np.array_equal(mask, expected) or lesion_type != item.lesion_type):
            raise ExportError(f"{fmt} export of {item.id} does not read back as written")


def export(items: list[Item], fmt: Format, out_dir: Path) -> ExportReport:
    """Write ``items`` as ``fmt`` into the fresh folder ``out_dir``, read it back and compare."""
    if fmt not in WRITERS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    try:
        check_fresh(out_dir)
    except FileExistsError as err:
        raise ExportError(f"{err}: name a new --out folder") from None
    write, read = WRITERS[fmt]
    n_objects = write(items, out_dir)
    _verify(items, read(out_dir), fmt)
    return ExportReport(fmt, out_dir, len(items), n_objects)
