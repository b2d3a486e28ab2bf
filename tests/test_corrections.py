"""Reviewer corrections: validated batches, append-only versions, merge into training, retrain
decision, and the kfp-free parts of `lesionflow retrain` (real SQLite MLflow, real DVC)."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from lesionflow import cli, config, corrections, lineage, registry, retrain, tracking
from lesionflow.data.manifest import (
    Record,
    read_manifest,
    staged_dataset,
    write_manifest,
    write_png,
)
from lesionflow.errors import CorrectionError, RegistryError
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path):
    p = config.load(REPO / "params.yaml", [f"runtime.workdir={tmp_path / 'work'}",
                                           "runtime.model_name=corr-model"])
    tracking.connect(p)
    yield p
    mlflow.set_tracking_uri(None)


def register_version(params, corrections_md5: str = "none") -> str:
    model = Segmenter(UNet(3, 4, 2), 16, [0.0] * 3, [1.0] * 3)
    with mlflow.start_run():
        return registry.register_model(model, name=params.runtime.model_name, metrics={}, lineage={
            lineage.TAG_DATASET_MD5: "0" * 32 + ".dir", lineage.TAG_PARAMS_HASH: "p",
            lineage.TAG_PIPELINE_RUN_ID: "r", lineage.TAG_CORRECTIONS_MD5: corrections_md5})


def pixels(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def make_batch(root: Path, items: dict[str, int], *, masks: bool = True, versions: dict | None = None,
               square: int = 6) -> Path:
    """A reviewer export: images/<id>.png from ``pixels(seed)``, masks/<id>.png, corrections.csv."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, seed in items.items():
        Image.fromarray(pixels(seed)).save(root / "images" / f"{name}.png")
        if masks:
            mask = np.zeros((24, 24), np.uint8)
            mask[4:4 + square, 4:4 + square] = 255
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    if versions is not None:
        with open(root / corrections.CSV, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "lesion_type", "model_version"])
            writer.writerows([name, "polyp", versions.get(name, "")] for name in items)
    return root


def test_batches_make_new_versions_and_never_rewrite_old_ones(params, tmp_path):
    v1 = register_version(params)
    first = corrections.add(params, str(make_batch(tmp_path / "b1", {"a": 1, "b": 2})), model_version=v1)
    assert first.n_corrections == 2 and corrections.latest(params) == first
    # `b` is corrected again (new mask), `c` is new; `c` names its version in the CSV
    second = corrections.add(params, str(make_batch(tmp_path / "b2", {"b": 2, "c": 3}, square=10,
                                                    versions={"c": v1})), model_version=v1)
    assert second.md5 != first.md5 and corrections.latest(params) == second
    records = {r.id: r for r in read_manifest(corrections.restore(params, second.md5, tmp_path / "r2"))}
    assert sorted(records) == ["correction-a", "correction-b", "correction-c"]
    assert {r.kind for r in records.values()} == {"correction"}
    assert {r.split for r in records.values()} == {"train"}
    assert {r.corrected_from for r in records.values()} == {v1}
    assert records["correction-c"].lesion_type == "polyp"
    # the first version is still restorable with its own (older) mask of `b`
    old = {r.id: r for r in read_manifest(corrections.restore(params, first.md5, tmp_path / "r1"))}
    assert sorted(old) == ["correction-a", "correction-b"]
    assert old["correction-b"].mask_sha256 != records["correction-b"].mask_sha256
    # new since the first version: the re-corrected `b` and the new `c`
    assert corrections.count_new(params, second, first.md5) == 2
    assert corrections.count_new(params, second, None) == 3


def test_bad_batches_are_refused_and_nothing_is_recorded(params, tmp_path):
    v1 = register_version(params)
    good = corrections.add(params, str(make_batch(tmp_path / "ok", {"a": 1})), model_version=v1)
    with pytest.raises(CorrectionError, match="without a corrected mask.*x"):
        corrections.add(params, str(make_batch(tmp_path / "nomask", {"x": 5}, masks=False)),
                        model_version=v1)
    with pytest.raises(CorrectionError, match="no model version for y"):
        corrections.add(params, str(make_batch(tmp_path / "nover", {"y": 6})))
    with pytest.raises(RegistryError, match="no version '99'"):
        corrections.add(params, str(make_batch(tmp_path / "badver", {"z": 7})), model_version="99")
    assert corrections.latest(params) == good
    with pytest.raises(CorrectionError, match="not a recorded corrections version"):
        corrections.find(params, "f" * 32 + ".dir")


def _dataset(root: Path, split_of: dict[str, str]) -> Path:
    with staged_dataset(root) as stage:
        records = []
        for i, (name, split) in enumerate(split_of.items()):
            image = pixels(i)
            mask = np.zeros((24, 24), np.uint8)
            records.append(Record(
                id=name, kind="still", image=f"images/{name}.png", mask=f"masks/{name}.png",
                image_sha256=write_png(image, stage / "images" / f"{name}.png"),
                mask_sha256=write_png(mask, stage / "masks" / f"{name}.png"),
                height=24, width=24, channels=3, lesion_type="polyp", group=name, split=split,
                source=name))
        write_manifest(stage, records)
    return root


def test_merge_supersedes_train_masks_and_keeps_test_images_out(params, tmp_path):
    dataset = _dataset(tmp_path / "ds", {"tr": "train", "te": "test", "va": "val"})
    records = read_manifest(dataset)
    v1 = register_version(params)
    # pixels(0) is the train image, pixels(1) the test image, 42 an image the dataset lacks
    version = corrections.add(params, str(make_batch(tmp_path / "b", {"p": 0, "q": 1, "n": 42})),
                              model_version=v1)
    merged_dir = tmp_path / "merged"
    report = corrections.merge(dataset, corrections.restore(params, version.md5, tmp_path / "c"),
                               merged_dir)
    assert (report.added, report.replaced, report.held_out) == (2, 1, ["correction-q"])
    merged = {r.id: r for r in read_manifest(merged_dir)}
    assert sorted(merged) == ["correction-n", "correction-p", "te", "va"]
    assert merged["te"] == next(r for r in records if r.id == "te")
    assert (merged_dir / "fingerprint.json").is_file()


def test_retrain_counts_corrections_the_last_attempt_has_not_seen(params, tmp_path, capsys):
    assert not retrain.decide(params, 1).start  # nothing recorded yet
    v1 = register_version(params)
    registry.move_alias(params.runtime.model_name, "champion", v1, why="test", action="promote")
    first = corrections.add(params, str(make_batch(tmp_path / "b1", {"a": 1, "b": 2})), model_version=v1)
    decision = retrain.decide(params, 3)
    assert (decision.start, decision.new_corrections, decision.corrections_md5) == (False, 2, first.md5)
    assert "need at least 3" in decision.reason
    assert retrain.decide(params, 2).start
    assert retrain.pinned(params, decision).corrections.dataset == first.md5
    # a champion trained on `first` has seen both: only later ones count
    v2 = register_version(params, corrections_md5=first.md5)
    registry.move_alias(params.runtime.model_name, "champion", v2, why="test", action="promote")
    second = corrections.add(params, str(make_batch(tmp_path / "b2", {"c": 3})), model_version=v2)
    decision = retrain.decide(params, 1)
    assert (decision.start, decision.new_corrections, decision.corrections_md5) == (True, 1, second.md5)
    # the CLI below the threshold says why and starts nothing
    args = ["--params", str(REPO / "params.yaml"), "--set", f"runtime.workdir={params.runtime.workdir}",
            "--set", "runtime.model_name=corr-model"]
    assert cli.main(["retrain", "--min-corrections", "5", *args]) == 0
    out = capsys.readouterr().out
    assert "nothing to do: 1 new correction(s) since the last attempt v2; need at least 5" in out
    assert cli.main(["corrections", "status", *args]) == 0
    assert second.md5 in capsys.readouterr().out
    # a candidate trained on `second` that the gate refused (registered, never champion) is an
    # attempt too: the scheduler must not retrain on the same corrections at every tick
    register_version(params, corrections_md5=second.md5)
    assert registry.champion_version(params.runtime.model_name) == v2
    decision = retrain.decide(params, 1)
    assert (decision.start, decision.new_corrections) == (False, 0)
    assert "0 new correction(s) since the last attempt v3" in decision.reason


def test_a_batch_from_s3_lands_on_the_s3_remote_via_the_tracking_server(
        tmp_path, mlflow_server, s3_server, s3_bucket):
    """The cluster set-up: batch on an S3 prefix, DVC remote on S3, MLflow over HTTP."""
    import boto3

    p = config.load(REPO / "params.yaml", [
        f"runtime.workdir={tmp_path / 'work'}", "runtime.model_name=corr-s3",
        f"runtime.mlflow_tracking_uri={mlflow_server}", f"runtime.s3_endpoint_url={s3_server}",
        f"runtime.dvc_remote=s3://{s3_bucket}/datasets"])
    tracking.connect(p)
    try:
        v1 = register_version(p)
        batch = make_batch(tmp_path / "b", {"a": 1, "b": 2}, versions={"a": v1, "b": v1})
        s3 = boto3.client("s3", endpoint_url=s3_server)
        for path in batch.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), s3_bucket, f"inbox/2026-11-25/{path.relative_to(batch)}")
        version = corrections.add(p, f"s3://{s3_bucket}/inbox/2026-11-25")
        assert corrections.latest(p) == version and version.n_corrections == 2
        restored = read_manifest(corrections.restore(p, version.md5, tmp_path / "restored"))
        assert sorted(r.id for r in restored) == ["correction-a", "correction-b"]
        assert any(o["Key"].startswith("datasets/") for o in
                   s3.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    finally:
        mlflow.set_tracking_uri(None)
