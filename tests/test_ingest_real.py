"""The three real datasets in ../shared/data, ingested with the params documented in the README;
skipped where the data is absent. These pin the dataset facts the splits rely on."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from lesionflow.config import IngestConfig
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import read_fingerprint, read_manifest
from tests.conftest import shared_dataset


def splits_per_group(records) -> dict[str, set[str]]:
    out = defaultdict(set)
    for r in records:
        out[r.group].add(r.split)
    return out


def test_cvc_clinicdb_splits_by_sequence(tmp_path):
    src = shared_dataset("cvc-clinicdb")
    cfg = IngestConfig(source=str(src), metadata_csv="sequences.csv", default_lesion_type="polyp",
                       columns={"id": "frame", "group": "sequence", "frame": "frame"})
    report = ingest(cfg, tmp_path / "cvc")
    records = read_manifest(tmp_path / "cvc")
    assert report.n_records == len(records) == 612
    groups = splits_per_group(records)
    assert len(groups) == 29 and all(len(s) == 1 for s in groups.values())
    assert set(report.counts["split"]) == {"train", "val", "test"}
    by_id = {r.id: r for r in records}
    assert by_id["1"].group == by_id["25"].group == "1" and by_id["26"].group == "2"
    assert by_id["200"].frame_index == 200 and by_id["200"].kind == "video_frame"
    assert (by_id["1"].height, by_id["1"].width, by_id["1"].channels) == (288, 384, 3)
    assert not report.merged_groups


def test_busi_types_empty_normals_and_duplicate_pair(tmp_path):
    src = shared_dataset("busi")
    cfg = IngestConfig(source=str(src), metadata_csv="labels.csv",
                       columns={"id": "id", "lesion_type": "lesion_type"})
    report = ingest(cfg, tmp_path / "busi")
    records = read_manifest(tmp_path / "busi")
    assert report.counts["lesion_type"] == {"benign": 437, "malignant": 210, "normal": 133}
    assert Counter(r.channels for r in records) == {1: 780}
    normals = [r for r in records if r.lesion_type == "normal"]
    assert all(not np.asarray(Image.open(tmp_path / "busi" / r.mask)).any() for r in normals)
    areas = read_fingerprint(tmp_path / "busi")["lesion_area"]["per_lesion_type"]
    assert areas["normal"]["empty_fraction"] == 1.0 and areas["benign"]["empty_fraction"] == 0.0
    by_id = {r.id: r for r in records}
    assert by_id["benign_433"].split == by_id["malignant_145"].split
    assert by_id["benign_433"].group == by_id["malignant_145"].group
    assert report.merged_groups == [["benign_433", "malignant_145"]]
    for t in ("benign", "malignant", "normal"):  # stratified: every type in every split
        assert {r.split for r in records if r.lesion_type == t} == {"train", "val", "test"}


def test_kvasir_seg_downscaled(tmp_path):
    src = shared_dataset("kvasir-seg")
    cfg = IngestConfig(source=str(src), max_side=256, default_lesion_type="polyp")
    report = ingest(cfg, tmp_path / "kvasir")
    records = read_manifest(tmp_path / "kvasir")
    assert report.n_records == len(records) == 1000
    assert max(max(r.height, r.width) for r in records) == 256
    # a keyed hash of each image's group decides its split: the fractions hold within a few %
    counts = report.counts["split"]
    assert abs(counts["train"] - 700) < 35 and abs(counts["val"] - 150) < 25 and abs(counts["test"] - 150) < 25
    assert {r.labelled_by for r in records} == {"annotator:unknown"}
    for r in records[::100]:
        assert Image.open(tmp_path / "kvasir" / r.image).size == (r.width, r.height)
        assert Image.open(tmp_path / "kvasir" / r.mask).size == (r.width, r.height)
