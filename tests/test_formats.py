"""Round trips through the reviewers' tools and the field's dataset formats.

A review batch goes out as Label Studio tasks, a CVAT for images 1.1 task and COCO; the export is
then edited the way each tool stores an edit (brush RLE re-encoded with Label Studio's converter,
a ``<mask>`` re-encoded with CVAT's SDK, a COCO segmentation re-encoded with pycocotools, a region
deleted, a polygon drawn) and read back by ``corrections add --format``: the stored corrections
hold exactly the edited masks, with the reviewer and the model version that predicted. Malformed
exports fail with a named error and store nothing. nnU-Net raw and VOC's labelmap.txt are checked
against the formats' own definitions (real SQLite MLflow, real DVC)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import mlflow
import numpy as np
import pytest
from cvat_sdk.masks import encode_mask
from label_studio_converter import brush
from PIL import Image
from pycocotools import mask as coco_mask

from lesionflow import cli, config, corrections, tracking
from lesionflow.config import IngestConfig
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import AnnotationFormatError
from lesionflow.export import dataset_items, export
from lesionflow.formats import cvat, labelstudio
from lesionflow.formats.batch import read_batch
from lesionflow.formats.review import export_batch
from lesionflow.steps.ingest import build_dataset
from tests.test_corrections import register_version
from tests.test_export import write_source

REPO = Path(__file__).resolve().parents[1]
H, W = 20, 28


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(params, a registered model version): one MLflow store and corrections history for the
    module; each test's batch has ids of its own (``write_review_batch``'s prefix)."""
    work = tmp_path_factory.mktemp("formats-work")
    p = config.load(REPO / "params.yaml", [f"runtime.workdir={work}", "runtime.model_name=formats-model"])
    tracking.connect(p)
    yield p, register_version(p)
    mlflow.set_tracking_uri(None)


def square(top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def write_review_batch(root: Path, model_version: str, prefix: str) -> Path:
    """What `lesionflow review next` writes: images, 0/255 predictions and batch.json for items
    ``<prefix>a`` .. ``<prefix>c`` (``b`` has two predicted regions, ``c`` none and no lesion type)."""
    predictions = {f"{prefix}a": square(3, 4, 6), f"{prefix}b": square(2, 2, 4) | square(12, 18, 5),
                   f"{prefix}c": np.zeros((H, W), bool)}
    types = dict(zip(predictions, ["polyp", "polyp", None]))
    (root / "images").mkdir(parents=True)
    (root / "predictions").mkdir()
    items = []
    for n, (name, mask) in enumerate(predictions.items()):
        pixels = np.random.default_rng(n).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "predictions" / f"{name}.png")
        items.append({"id": name, "image": f"images/{name}.png", "prediction": f"predictions/{name}.png",
                      "lesion_type": types[name], "score": 0.5 + n / 10, "source": f"dataset:{name}"})
    (root / "batch.json").write_text(json.dumps({"strategy": "entropy", "model_version": model_version,
                                                 "created": "2026-11-29T15:00:00+00:00", "items": items}))
    return root


def stored(params, version, prefix: str) -> dict:
    """{a|b|c: (record, mask)} of this test's corrections in a recorded version (restored from
    the DVC remote)."""
    out = corrections.restore(params, version.md5, Path(params.runtime.workdir) / f"restored-{version.md5[:8]}")
    head = f"{corrections.ID_PREFIX}{prefix}"
    return {r.id[len(head):]: (r, np.asarray(Image.open(out / r.mask)) > 0)
            for r in read_manifest(out) if r.id.startswith(head)}


def test_label_studio_round_trip(registered, tmp_path):
    params, v1 = registered
    batch = read_batch(write_review_batch(tmp_path / "batch", v1, "ls-"))
    out = tmp_path / "ls"
    export_batch(batch.root, "label-studio", out)
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["lesionflow_id"] for t in tasks] == ["ls-a", "ls-b", "ls-c"]
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == v1
    result = prediction["result"][0]
    assert (result["type"], result["value"]["format"], result["value"]["brushlabels"]) == (
        "brushlabels", "rle", ["polyp"])
    # Label Studio's own decoder sees the prediction in the alpha channel
    alpha = brush.decode_rle(bytes(result["value"]["rle"])).reshape(H, W, 4)[:, :, 3]
    assert np.array_equal(alpha > 0, batch.items[0].mask())
    assert tasks[2]["predictions"][0]["result"] == []  # nothing predicted on c
    assert '<Label value="lesion"/>' in (out / "labeling_config.xml").read_text()

    # the reviewers' edits as Label Studio stores them: a brush stroke widens a's lesion (ann, a
    # user object in older exports); bob deletes b's second region and skipped c
    edited_a = batch.items[0].mask() | square(10, 10, 5)
    edited_b = square(2, 2, 4)

    def annotation(mask, who, **extra):
        return {"id": 1, "completed_by": who, "was_cancelled": False, "updated_at": "2026-11-29T16:00:00Z",
                "result": [{**result, "value": {"format": "rle", "brushlabels": ["polyp"],
                                                "rle": brush.mask2rle(mask.astype(np.uint8) * 255)}}],
                **extra}

    tasks[0]["annotations"] = [annotation(~edited_a, 7, updated_at="2026-11-29T15:10:00Z"),
                               annotation(edited_a, {"id": 3, "email": "ann@example.org"})]
    tasks[1]["annotations"] = [annotation(edited_b, 4)]
    tasks[2]["annotations"] = [annotation(square(0, 0, 3), 4, was_cancelled=True)]
    (out / "project-1-at-2026-11-29.json").write_text(json.dumps(tasks))

    version = corrections.add(params, str(out), fmt="label-studio", reviewer="fallback")
    records = stored(params, version, "ls-")
    assert sorted(records) == ["a", "b"]  # c was skipped: not a correction
    assert np.array_equal(records["a"][1], edited_a)
    assert np.array_equal(records["b"][1], edited_b)
    assert records["a"][0].labelled_by == "reviewer:ann@example.org"
    assert records["b"][0].labelled_by == "reviewer:label-studio-user-4"
    assert {r.corrected_from for r, _ in records.values()} == {v1}
    assert {r.lesion_type for r, _ in records.values()} == {"polyp"}


def test_cvat_round_trip_through_the_cli(registered, tmp_path, capsys):
    params, v1 = registered
    batch = read_batch(write_review_batch(tmp_path / "batch", v1, "cv-"))
    out = tmp_path / "cvat"
    overrides = ["--params", str(REPO / "params.yaml"), "--set", f"runtime.workdir={params.runtime.workdir}",
                 "--set", "runtime.model_name=formats-model"]
    assert cli.main(["review", "export", "--batch", str(batch.root), "--format", "cvat", "--out", str(out),
                     *overrides]) == 0
    assert "read back and verified" in capsys.readouterr().out
    tree = ET.parse(out / "annotations.xml")
    doc = tree.getroot()
    assert doc.findtext("version") == "1.1"
    assert [lab.findtext("type") for lab in doc.iter("label")] == ["mask", "mask"]
    images = {el.attrib["name"][3:-4]: el for el in doc.iter("image")}
    assert [len(images[n].findall("mask")) for n in "abc"] == [1, 2, 0]  # one per region

    # CVAT's export after review: dan (the job's assignee) repainted a's mask (CVAT stores the
    # shape's points, which its dumper writes as rle/left/top/width/height), deleted b's second
    # region (the smaller: regions come largest first) and drew a polygon on c
    edited_a = square(5, 6, 7)
    mask = images["a"].find("mask")
    *runs, left, top, right, bottom = encode_mask(edited_a)
    mask.attrib.update({"rle": ", ".join(map(str, runs)), "left": str(left), "top": str(top),
                        "width": str(right - left + 1), "height": str(bottom - top + 1),
                        "source": "manual"})
    b_masks = images["b"].findall("mask")
    images["b"].remove(b_masks[1])
    ET.SubElement(images["c"], "polygon", {"label": "lesion", "source": "manual", "occluded": "0",
                                               "points": "2.0,2.0;9.0,2.0;9.0,7.0;2.0,7.0", "z_order": "0"})
    task = doc.find("meta/task")
    ET.SubElement(ET.SubElement(task, "owner"), "username").text = "admin"
    ET.SubElement(ET.SubElement(task, "assignee"), "username").text = "dan"
    tree.write(out / "annotations.xml", encoding="utf-8", xml_declaration=True)

    assert cli.main(["corrections", "add", "--source", str(out), "--format", "cvat", *overrides]) == 0
    records = stored(params, corrections.latest(params), "cv-")
    expected_c = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(
        [[2.0, 2.0, 9.0, 2.0, 9.0, 7.0, 2.0, 7.0]], H, W))).astype(bool)
    assert expected_c.sum() > 0
    for name, expected in (("a", edited_a), ("b", square(12, 18, 5)), ("c", expected_c)):
        record, got = records[name]
        assert np.array_equal(got, expected), name
        assert (record.labelled_by, record.corrected_from) == ("reviewer:dan", v1)
    # c's batch lesion type is unknown and the generic label says nothing: the ingest default
    assert records["c"][0].lesion_type == params.ingest.default_lesion_type
    assert records["a"][0].lesion_type == "polyp"


def test_coco_round_trip(registered, tmp_path):
    params, v1 = registered
    batch = read_batch(write_review_batch(tmp_path / "batch", v1, "co-"))
    out = tmp_path / "coco"
    export_batch(batch.root, "coco", out)
    doc = json.loads((out / "annotations.json").read_text())
    edited_a = square(0, 0, 9)
    rle = coco_mask.encode(np.asfortranarray(edited_a.astype(np.uint8)))
    a_image = next(i["id"] for i in doc["images"] if i["lesionflow_id"] == "co-a")
    ann = next(a for a in doc["annotations"] if a["image_id"] == a_image)
    ann["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    (out / "annotations.json").write_text(json.dumps(doc))

    version = corrections.add(params, str(out), fmt="coco", reviewer="erin")
    records = stored(params, version, "co-")
    assert np.array_equal(records["a"][1], edited_a)
    assert np.array_equal(records["b"][1], batch.items[1].mask())  # unchanged
    assert not records["c"][1].any()
    assert {(r.labelled_by, r.corrected_from) for r, _ in records.values()} == {("reviewer:erin", v1)}


def _ls_export(out: Path, edit) -> None:
    tasks = json.loads((out / "tasks.json").read_text())
    for task in tasks:
        task["annotations"] = [{"id": 1, "completed_by": 1, "result": task["predictions"][0]["result"]}]
    edit(tasks)
    (out / "export.json").write_text(json.dumps(tasks))


@pytest.mark.parametrize("fmt, break_it, message", [
    ("label-studio", lambda out: _ls_export(out, lambda t: t[0]["annotations"][0]["result"][0]["value"]
                                            .update(rle=[1, 2, 3])), "brush RLE"),
    ("label-studio", lambda out: _ls_export(out, lambda t: t[0]["data"].pop("lesionflow_id")),
     "no data.lesionflow_id"),
    ("label-studio", lambda out: None, "0 Label Studio exports"),
    ("cvat", lambda out: (out / "annotations.xml").write_text(
        (out / "annotations.xml").read_text().replace('<mask label="polyp"', '<box label="polyp"', 1)),
     "only masks and polygons"),
    ("cvat", lambda out: (out / "annotations.xml").write_text("<annotations><version>1.1"), "not XML"),
    ("cvat", lambda out: (out / "annotations.xml").write_text(
        (out / "annotations.xml").read_text().replace('name="a.png"', 'name="zz.png"')), "is missing"),
    ("coco", lambda out: (out / "annotations.json").unlink(), "0 COCO annotation files"),
    ("coco", lambda out: (out / "annotations.json").write_text(
        (out / "annotations.json").read_text().replace('"file_name": "a.png"', '"file_name": "q.png"')),
     "'q.png': its file is not under"),
])
def test_malformed_exports_are_named_errors_and_store_nothing(registered, tmp_path, fmt, break_it,
                                                             message):
    params, v1 = registered
    before = corrections.latest(params)
    batch = read_batch(write_review_batch(tmp_path / "batch", v1, ""))
    out = tmp_path / "out"
    export_batch(batch.root, fmt, out)
    break_it(out)
    with pytest.raises(AnnotationFormatError, match=message):
        corrections.add(params, str(out), fmt=fmt)
    assert corrections.latest(params) == before


def test_an_image_outside_the_batch_is_refused(registered, tmp_path):
    params, v1 = registered
    batch = read_batch(write_review_batch(tmp_path / "batch", v1, ""))
    out = tmp_path / "ls"
    export_batch(batch.root, "label-studio", out)

    def stranger(tasks):
        tasks[0]["data"]["lesionflow_id"] = "x"
    _ls_export(out, stranger)
    Image.open(out / "images" / "a.png").save(out / "images" / "x.png")
    with pytest.raises(AnnotationFormatError, match="'x' of the export is not in the review batch"):
        corrections.add(params, str(out), fmt="label-studio")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    params = config.load(None, [f"ingest.source={write_source(root / 'source')}",
                                "ingest.folder_fields=[lesion_type]", f"runtime.workdir={root / 'work'}"])
    build_dataset(params, root / "dataset")
    return root / "dataset"


def test_nnunet_export_and_ingest_round_trip(dataset, tmp_path):
    out = tmp_path / "Dataset501_Lesions"
    export(dataset_items(dataset), "nnunet", out)
    meta = json.loads((out / "dataset.json").read_text())
    records = {r.id: r for r in read_manifest(dataset)}
    train = sorted(r.id for r in records.values() if r.mask is not None and r.split != "test")
    assert meta["labels"] == {"background": 0, "oval": 1, "round": 2}
    assert (meta["channel_names"], meta["file_ending"], meta["numTraining"]) == (
        {"0": "R", "1": "G", "2": "B"}, ".png", len(train))
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{i}_0000.png" for i in train]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{i}.png" for i in train]
    label = np.asarray(Image.open(out / "labelsTr" / f"{train[0]}.png"))
    assert set(np.unique(label)) == {0, meta["labels"][records[train[0]].lesion_type]}

    # the raw layout as an ingest source: same ids, lesion types and pixels
    again = tmp_path / "again"
    ingest(IngestConfig(source=str(out)), again)
    back = {r.id: r for r in read_manifest(again)}
    assert sorted(back) == sorted(records)
    for rid, r in records.items():
        assert back[rid].lesion_type == r.lesion_type or r.mask is None
        assert (back[rid].mask is None) == (r.mask is None)
        if r.mask is not None:
            assert np.array_equal(np.asarray(Image.open(again / back[rid].mask)) > 0,
                                  np.asarray(Image.open(dataset / r.mask)) > 0)
        assert np.array_equal(np.asarray(Image.open(again / back[rid].image)),
                              np.asarray(Image.open(dataset / r.image)))


@pytest.mark.parametrize("break_it, message", [
    (lambda out: (out / "imagesTr" / "x_0001.png").write_bytes(
        next((out / "imagesTr").iterdir()).read_bytes()), "input channel 0001"),
    (lambda out: Image.fromarray(np.full((40, 48), 7, np.uint8)).save(next((out / "labelsTr").iterdir())),
     "label values \\[7\\]"),
    (lambda out: next((out / "labelsTr").iterdir()).unlink(), "has no labelsTr/"),
    (lambda out: (out / "dataset.json").write_text('{"labels": {"background": 0}}'), "lacks"),
])
def test_malformed_nnunet_sources_are_named_errors(dataset, tmp_path, break_it, message):
    out = tmp_path / "Dataset502_Broken"
    export(dataset_items(dataset), "nnunet", out)
    break_it(out)
    with pytest.raises(AnnotationFormatError, match=message):
        ingest(IngestConfig(source=str(out)), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_voc_labelmap_names_the_classes_in_the_class_png_colours(dataset, tmp_path):
    out = tmp_path / "voc"
    export(dataset_items(dataset), "voc", out)
    lines = (out / "labelmap.txt").read_text().splitlines()
    assert lines[0] == "# label:color_rgb:parts:actions"
    colours = {}
    for line in lines[1:]:
        name, rgb, parts, actions = line.split(":")
        colours[name] = tuple(map(int, rgb.split(",")))
        assert (parts, actions) == ("", "")
    assert list(colours) == ["background", "oval", "round"]
    # each class's colour is the colour its pixels have in SegmentationClass (as CVAT maps them)
    for r in read_manifest(dataset):
        if r.mask is None:
            continue
        png = Image.open(out / "SegmentationClass" / f"{r.id}.png")
        rgb = np.asarray(png.convert("RGB"))
        lesion = np.asarray(Image.open(dataset / r.mask)) > 0
        assert {tuple(c) for c in rgb[lesion]} == {colours[r.lesion_type]}
        assert {tuple(c) for c in rgb[~lesion]} == {colours["background"]}


def test_ls_decode_names_a_size_mismatch():
    rle = labelstudio.encode(square(1, 1, 3))
    with pytest.raises(AnnotationFormatError, match="not 10x10x4"):
        labelstudio.decode(rle, 10, 10, "task 1")


def test_cvat_xml_written_by_datumaro_reads_back(tmp_path):
    """Datumaro (the dataset library CVAT's own import/export is built on) wrote this export of
    the batch below with a's mask repainted: an independent writer of the same format."""
    batch = read_batch(write_review_batch(tmp_path / "batch", "1", ""))
    out = tmp_path / "from-datumaro"
    export_batch(batch.root, "cvat", out)
    (out / "annotations.xml").write_bytes(
        (REPO / "tests" / "data" / "formats" / "cvat_written_by_datumaro.xml").read_bytes())
    got = {c.id: c for c in cvat.read_export(out)}
    assert np.array_equal(got["a"].mask, square(5, 6, 7)) and got["a"].lesion_type == "polyp"
    for item in batch.items[1:]:
        assert np.array_equal(got[item.id].mask, item.mask())


def test_brush_rle_written_by_label_studios_encoder_reads_back():
    """The frontend encodes brush regions with @thi.ng/rle-pack (JavaScript); this RLE was written
    by it, label colour in RGB and the region in alpha, as the editor's canvas holds it."""
    doc = json.loads((REPO / "tests" / "data" / "formats" / "labelstudio_brush_by_rle_pack.json").read_text())
    mask = labelstudio.decode(doc["rle"], doc["height"], doc["width"], "fixture")
    assert np.array_equal(mask, square(3, 4, 6) | square(10, 10, 5))
