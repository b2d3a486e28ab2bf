"""Export: a real (synthetic) dataset written as COCO, Pascal VOC and plain JSON through the CLI,
then read with independent readers — pycocotools, ElementTree + PIL, bare JSON — and compared
with the dataset's own mask PNGs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from lesionflow import config
from lesionflow.cli import main
from lesionflow.data.manifest import read_manifest
from lesionflow.steps.ingest import build_dataset


def write_source(root):
    """A folder source: two lesion types, images with one or two disc lesions (several objects per
    image), and one image without a mask (an unlabelled record)."""
    yy, xx = np.mgrid[:40, :48]
    for i in range(8):
        lesion_type = ("round", "oval")[i % 2]
        mask = (yy - 12) ** 2 + (xx - 10 - i) ** 2 < 30
        if i % 3 == 0:
            mask |= (yy - 28) ** 2 / 2 + (xx - 34) ** 2 < 40
        image = np.where(mask[..., None], 200, 60).astype(np.uint8).repeat(3, axis=2)
        image[::5] += 10  # some texture
        for sub, array in (("images", image), ("masks", mask.astype(np.uint8) * 255)):
            if sub == "masks" and i == 7:
                continue
            (root / sub / lesion_type).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / lesion_type / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(dataset dir, {id: (record, mask or None)}) ingested from ``write_source``."""
    root = tmp_path_factory.mktemp("export")
    source = write_source(root / "source")
    params = config.load(None, [f"ingest.source={source}", "ingest.folder_fields=[lesion_type]",
                                f"runtime.workdir={root / 'work'}"])
    build_dataset(params, root / "dataset")
    masks = {r.id: (r, None if r.mask is None else np.asarray(Image.open(root / "dataset" / r.mask)) > 0)
             for r in read_manifest(root / "dataset")}
    assert sum(m is None for _, m in masks.values()) == 1 and len(masks) == 8
    return root / "dataset", masks


def run_export(dataset_dir, fmt, out, capsys) -> str:
    assert main(["export", "--dataset", str(dataset_dir), "--format", fmt, "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_coco_reads_back_with_pycocotools(dataset, tmp_path, capsys):
    dataset_dir, masks = dataset
    out = run_export(dataset_dir, "coco", tmp_path / "coco", capsys)
    assert f"exported {len(masks)} images" in out and "verified" in out
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == sorted({r.lesion_type for r, _ in masks.values()})
    assert max(len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()) == 2  # two lesions, two objects
    for img in coco.loadImgs(coco.getImgIds()):
        record, truth = masks[img["lesionflow_id"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert (tmp_path / "coco" / "images" / img["file_name"]).is_file()
        if truth is None:
            assert anns == []
            continue
        union = np.zeros(truth.shape, bool)
        for ann in anns:
            part = coco.annToMask(ann) > 0
            assert not (union & part).any()  # one annotation per connected region
            ys, xs = np.nonzero(part)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == part.sum() and names[ann["category_id"]] == record.lesion_type
            union |= part
        assert np.array_equal(union, truth)


def test_voc_masks_and_xml_match_the_dataset(dataset, tmp_path, capsys):
    dataset_dir, masks = dataset
    run_export(dataset_dir, "voc", tmp_path / "voc", capsys)
    voc = tmp_path / "voc"
    labels = (voc / "labels.txt").read_text().split()
    assert labels[0] == "background"
    for record_id, (record, truth) in masks.items():
        root = ET.parse(voc / "Annotations" / f"{record_id}.xml").getroot()
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (record.width, record.height)
        assert (voc / "JPEGImages" / root.findtext("filename")).is_file()
        if truth is None:
            assert root.findtext("segmented") == "0" and root.find("object") is None
            continue
        classes = np.asarray(Image.open(voc / "SegmentationClass" / f"{record_id}.png"))
        objects = np.asarray(Image.open(voc / "SegmentationObject" / f"{record_id}.png"))
        assert Image.open(voc / "SegmentationClass" / f"{record_id}.png").mode == "P"
        assert np.array_equal(classes > 0, truth) and set(np.unique(classes)) <= {0, labels.index(record.lesion_type)}
        assert np.array_equal(objects > 0, truth) and objects.max() == len(root.findall("object"))
        for k, obj in enumerate(root.findall("object"), start=1):
            ys, xs = np.nonzero(objects == k)
            box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert obj.findtext("name") == record.lesion_type
            assert box == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]
        assert record_id in (voc / "ImageSets" / "Segmentation" / f"{record.split}.txt").read_text().split()


def test_plain_json_decodes_without_any_library(dataset, tmp_path, capsys):
    dataset_dir, masks = dataset
    run_export(dataset_dir, "json", tmp_path / "json", capsys)
    doc = json.loads((tmp_path / "json" / "lesions.json").read_text())
    assert doc["schema"] == "lesionflow.lesions/v1" and len(doc["items"]) == len(masks)
    for item in doc["items"]:
        record, truth = masks[item["id"]]
        assert (item["lesion_type"], item["split"]) == (record.lesion_type, record.split)
        assert (tmp_path / "json" / item["image"]).is_file()
        if truth is None:
            assert item["mask"] is None
            continue
        flat, value = [], False
        for run in item["mask"]["counts"]:
            flat += [value] * run
            value = not value
        assert np.array_equal(np.array(flat).reshape(item["mask"]["size"]), truth)


def test_export_refuses_a_used_folder_and_unknown_format(dataset, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    used = ["export", "--dataset", str(dataset[0]), "--format", "json", "--out", str(tmp_path / "used")]
    assert main(used) == 2
    err = capsys.readouterr().err
    assert "ExportError" in err and "not empty" in err and (tmp_path / "used" / "x").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["export", "--dataset", str(dataset[0]), "--format", "yolo", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'yolo'" in capsys.readouterr().err
