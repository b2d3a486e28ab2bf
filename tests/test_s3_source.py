"""Ingest from an S3 prefix on a real (moto) S3 server: the dataset must be byte-identical to
ingesting the same folder from disk, and S3-specific failures must name the URL."""

from __future__ import annotations

import csv

import boto3
import numpy as np
import pytest
from PIL import Image

from lesionflow.config import IngestConfig
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import MANIFEST, read_manifest
from lesionflow.data.sources import materialize_source
from lesionflow.errors import EmptySourceError, UnreadableImageError


def make_source(root):
    (root / "images/sub").mkdir(parents=True)
    (root / "masks/sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        rel = f"sub/case{i}" if i % 2 else f"case{i}"
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"images/{rel}.png")
        m = np.zeros((20, 24), np.uint8)
        m[5:10, 6:12] = 255
        Image.fromarray(m).save(root / f"masks/{rel}.png")
        rows.append({"id": f"case{i}", "type": "polyp" if i < 3 else "adenoma"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "type"])
        w.writeheader()
        w.writerows(rows)
    return root


def upload(client, bucket, root, prefix):
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


def cfg(source, **kw):
    return IngestConfig(source=source, metadata_csv="labels.csv",
                        columns={"id": "id", "lesion_type": "type"}, **kw)


def test_s3_prefix_gives_the_same_dataset_as_the_folder(tmp_path, s3_server, s3_bucket):
    src = make_source(tmp_path / "src")
    client = boto3.client("s3", endpoint_url=s3_server)
    upload(client, s3_bucket, src, "raw/v1")
    # a sibling prefix sharing the name's start must not leak in
    client.put_object(Bucket=s3_bucket, Key="raw/v10/images/intruder.png", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="raw/v1/images/", Body=b"")  # console "folder" marker

    ingest(cfg(str(src), split_seed=7), tmp_path / "local")
    report = ingest(cfg(f"s3://{s3_bucket}/raw/v1/", split_seed=7), tmp_path / "remote",
                    endpoint_url=s3_server)
    assert report.n_records == 6
    for name in (MANIFEST, "fingerprint.json", "ingest_report.json"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes()
    sources = {r.source for r in read_manifest(tmp_path / "remote")}
    assert {"images/sub/case1.png", "images/case0.png"} <= sources


def test_endpoint_from_environment(tmp_path, s3_server, s3_bucket, monkeypatch):
    src = make_source(tmp_path / "src")
    upload(boto3.client("s3", endpoint_url=s3_server), s3_bucket, src, "data")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    staged = materialize_source(f"s3://{s3_bucket}/data", None, tmp_path / "staging")
    assert (staged / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
    assert (staged / "images/sub/case1.png").is_file()


def test_empty_prefix_raises_naming_the_url(tmp_path, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/nothing/here"
    with pytest.raises(EmptySourceError, match=url):
        ingest(cfg(url), tmp_path / "out", endpoint_url=s3_server)
    assert list(tmp_path.iterdir()) == []


def test_bad_file_in_s3_is_named_by_its_url(tmp_path, s3_server, s3_bucket):
    src = make_source(tmp_path / "src")
    (src / "images/case0.png").write_bytes(b"corrupt")
    upload(boto3.client("s3", endpoint_url=s3_server), s3_bucket, src, "in")
    with pytest.raises(UnreadableImageError, match=f"s3://{s3_bucket}/in/images/case0.png"):
        ingest(cfg(f"s3://{s3_bucket}/in"), tmp_path / "out", endpoint_url=s3_server)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
