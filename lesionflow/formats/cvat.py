"""CVAT: a review batch as a "CVAT for images 1.1" task, and that format's export read back.

Export folder (``lesionflow review export --format cvat``), the layout of CVAT's own export::

    annotations.xml         <annotations><version>1.1</version><meta> (labels of type mask) and an
                            <image id name width height> per item holding one <mask> per
                            connected predicted region
    images/<id>.png         create the task from these, then Upload annotations → CVAT 1.1
    lesionflow_batch.json   the batch (model version that predicted)

A ``<mask>`` carries CVAT's own run lengths (``rle="bg, fg, bg, ..."`` over the ``left``, ``top``,
``width`` x ``height`` box, row-major, starting with background); ``cvat_sdk.masks`` (CVAT's SDK)
encodes and decodes them as the ``points`` of a mask shape, which is what CVAT's XML dumper and
loader convert to and from. Import: unzip CVAT's "CVAT for images 1.1" export into the folder
(it replaces annotations.xml); each image's masks and polygons (rasterized with pycocotools, as
Datumaro does) are united into the reviewer's mask, an image with no shape says "no lesion". The
reviewer is the task's or job's assignee (else its owner) from ``<meta>``.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element, ElementTree, SubElement

import numpy as np
from cvat_sdk.masks import decode_mask, encode_mask
from defusedxml import ElementTree as SafeET
from pycocotools import mask as coco_mask

from lesionflow.errors import AnnotationFormatError
from lesionflow.export import lesion_regions, voc_palette
from lesionflow.formats.batch import Correction, ReviewBatch, start_export

ANNOTATIONS = "annotations.xml"
OUTLINES = ("mask", "polygon")
NOT_OUTLINES = ("box", "polyline", "points", "ellipse", "cuboid", "skeleton")


def mask_element(parent: Element, region: np.ndarray, label: str) -> None:
    """One ``<mask>`` for a bool HxW region, as CVAT's dumper writes a mask shape's points."""
    *runs, left, top, right, bottom = encode_mask(region)
    SubElement(parent, "mask", {"label": label, "source": "auto", "occluded": "0",
                                "rle": ", ".join(str(int(r)) for r in runs), "left": str(left),
                                "top": str(top), "width": str(right - left + 1),
                                "height": str(bottom - top + 1), "z_order": "0"})


def decode_mask_element(el: Element, height: int, width: int, where: str) -> np.ndarray:
    """A ``<mask>`` → bool HxW, through the points CVAT's loader builds from its attributes."""
    try:
        left, top = int(el.attrib["left"]), int(el.attrib["top"])
        points = [int(v) for v in el.attrib["rle"].split(",")]
        points += [left, top, left + int(el.attrib["width"]) - 1, top + int(el.attrib["height"]) - 1]
        return decode_mask(points, image_width=width, image_height=height)
    except (KeyError, ValueError) as err:
        raise AnnotationFormatError(f"{where}: <mask> does not decode ({type(err).__name__}: {err})"
                                    ) from None


def polygon_mask(el: Element, height: int, width: int, where: str) -> np.ndarray:
    try:
        xy = [float(v) for pair in el.attrib["points"].split(";") for v in pair.split(",")]
    except (KeyError, ValueError) as err:
        raise AnnotationFormatError(f"{where}: <polygon> has no readable points ({err})") from None
    if len(xy) < 6 or len(xy) % 2:
        raise AnnotationFormatError(f"{where}: <polygon> needs at least three x,y points")
    rle = coco_mask.merge(coco_mask.frPyObjects([xy], height, width))
    return coco_mask.decode(rle).astype(bool)


def write_task(batch: ReviewBatch, out: Path) -> int:
    """The batch as a CVAT for images 1.1 task; returns the number of mask shapes."""
    start_export(batch, out)
    palette = voc_palette()
    root = Element("annotations")
    SubElement(root, "version").text = "1.1"
    task = SubElement(SubElement(root, "meta"), "task")
    SubElement(task, "name").text = f"lesionflow review ({batch.strategy}, model v{batch.model_version})"
    SubElement(task, "size").text = str(len(batch.items))
    SubElement(task, "mode").text = "annotation"
    labels = SubElement(task, "labels")
    for k, name in enumerate(batch.labels(), start=1):
        label = SubElement(labels, "label")
        SubElement(label, "name").text = name
        SubElement(label, "color").text = "#{:02x}{:02x}{:02x}".format(*palette[3 * k:3 * k + 3])
        SubElement(label, "type").text = "mask"
        SubElement(label, "attributes")
    shapes = 0
    for n, item in enumerate(batch.items):
        height, width = item.size()
        image = SubElement(root, "image", {"id": str(n), "name": f"{item.id}.png",
                                           "width": str(width), "height": str(height)})
        for region in lesion_regions(item.mask()):
            mask_element(image, region, item.label)
            shapes += 1
    ElementTree(root).write(out / ANNOTATIONS, encoding="utf-8", xml_declaration=True)
    return shapes


def _reviewer(meta: Element | None) -> str | None:
    if meta is None:
        return None
    for who in ("assignee", "owner"):
        name = meta.findtext(f"./*/{who}/username")  # <task> or <job>
        if name:
            return name
    return None


def read_export(root: Path) -> list[Correction]:
    """Every image of the CVAT for images 1.1 ``annotations.xml`` in ``root`` as a correction."""
    path = root / ANNOTATIONS
    try:
        doc = SafeET.parse(path).getroot()
    except FileNotFoundError:
        raise AnnotationFormatError(f"{path} not found: unzip CVAT's \"CVAT for images 1.1\" export "
                                    "into the folder") from None
    except SafeET.ParseError as err:
        raise AnnotationFormatError(f"{path} is not XML: {err}") from None
    if doc.tag != "annotations" or doc.findtext("version") != "1.1":
        raise AnnotationFormatError(f"{path} is not a CVAT 1.1 export (root <{doc.tag}>, version "
                                    f"{doc.findtext('version')!r})")
    if doc.find("track") is not None:
        raise AnnotationFormatError(f"{path} holds <track>s: export the task as \"CVAT for images "
                                    "1.1\", not for video")
    reviewer = _reviewer(doc.find("meta"))
    corrections = []
    for el in doc.iter("image"):
        name = el.attrib.get("name", "")
        where = f"{path.name} image {name!r}"
        try:
            height, width = int(el.attrib["height"]), int(el.attrib["width"])
        except (KeyError, ValueError):
            raise AnnotationFormatError(f"{where} has no width and height") from None
        image = root / "images" / Path(name).name
        if not name or not image.is_file():
            raise AnnotationFormatError(f"{where}: its image {image} is missing")
        mask, labels = np.zeros((height, width), bool), set()
        for shape in el:
            if shape.tag in NOT_OUTLINES:
                raise AnnotationFormatError(f"{where} has a <{shape.tag}>: only masks and polygons "
                                            "outline a lesion")
            if shape.tag not in OUTLINES:
                continue  # tags and attributes say nothing about pixels
            read = decode_mask_element if shape.tag == "mask" else polygon_mask
            mask |= read(shape, height, width, where)
            labels.add(shape.attrib.get("label"))
        if len(labels) > 1:
            raise AnnotationFormatError(f"{where} has shapes of {sorted(labels)}: one lesion type "
                                        "per image")
        corrections.append(Correction(image.stem, image, mask, next(iter(labels), None), reviewer))
    return corrections
