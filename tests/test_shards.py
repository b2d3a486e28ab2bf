"""Sharded datasets: files ↔ shards conversion, streaming to DataLoader workers and DDP ranks, and a
sharded version pushed to a real moto S3 server with the real `dvc` CLI and streamed back."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import boto3
import pytest
import torch
from torch.utils.data import DataLoader

from lesionflow.config import IngestConfig, MetadataColumns, SyntheticConfig
from lesionflow.data import synthetic
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import read_manifest
from lesionflow.data.shards import (
    SHARD_INDEX,
    SHARDS,
    LocalShards,
    RemoteShards,
    ShardStream,
    read_index,
    unshard,
    write_shards,
)
from lesionflow.errors import DatasetVersionError, ShardError
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.training import SegmentationDataset, labelled, reseed_worker
from lesionflow.versioning import restore_dataset, version_dataset

SHARD_MB = 0.02  # ~20 KiB: a few records per shard, so even a tiny dataset has many shards


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files_dataset(tmp_path_factory) -> Path:
    """A real ingested dataset: stills, one video and weak (maskless) records in three splits."""
    tmp = tmp_path_factory.mktemp("shards")
    source = synthetic.make_synthetic_source(
        SyntheticConfig(n_images=40, n_videos=1, frames_per_video=4, size=48, n_weak=3), tmp / "src")
    cfg = IngestConfig(source=str(source), metadata_csv=synthetic.METADATA_CSV,
                       columns=MetadataColumns(**synthetic.COLUMNS))
    ingest(cfg, tmp / "files")
    return tmp / "files"


@pytest.fixture(scope="module")
def sharded(files_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "ds"
    write_shards(files_dataset, out, SHARD_MB)
    return out


@pytest.fixture(scope="module")
def model() -> Segmenter:
    return Segmenter(UNet(3, 4, 2), 32, [0.0] * 3, [1.0] * 3)


def test_files_to_shards_and_back_gives_the_same_dataset(files_dataset, sharded, tmp_path):
    index = read_index(sharded)
    records = read_manifest(files_dataset)
    assert len(index) >= 10 and sorted(p.name for p in (sharded / SHARDS).iterdir()) == sorted(s.name for s in index)
    assert not (sharded / "images").exists() and not (sharded / "masks").exists()
    # one split per shard, ids in order, every record exactly once
    split_of = {r.id: r.split for r in records}
    assert all({split_of[i] for i in s.ids} == {s.split} and s.ids == sorted(s.ids) for s in index)
    assert Counter(i for s in index for i in s.ids) == Counter(split_of.keys())
    assert read_manifest(sharded) == records
    # content-addressed and deterministic: a rebuild is byte-identical
    again = write_shards(files_dataset, tmp_path / "again", SHARD_MB)
    assert again == index and contents(tmp_path / "again") == contents(sharded)

    back = unshard(sharded, tmp_path / "back")
    assert contents(back) == contents(files_dataset)  # records and every image/mask byte


def test_stream_gives_each_sample_once_from_each_workers_own_shards(files_dataset, sharded, model):
    records = labelled(read_manifest(files_dataset), "train")
    weights = [float(i) for i in range(len(records))]  # a weight names its record
    reference = SegmentationDataset(files_dataset, records, model, sample_weights=weights)
    stream = ShardStream(LocalShards(sharded), records, model, sample_weights=weights, shuffle_buffer=8,
                         num_workers=2)
    assert len(stream) == len(records)

    orders = []
    for _ in range(2):  # two epochs
        loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=reseed_worker)
        got = list(loader)
        order = [int(w) for _, _, w in got]
        assert sorted(order) == list(range(len(records)))  # every sample exactly once per epoch
        for image, target, w in got:
            ref_image, ref_target, ref_w = reference[int(w)]
            assert torch.equal(image, ref_image) and torch.equal(target, ref_target) and w == ref_w
        orders.append(order)
        # DataLoader takes samples from its workers in turn: while both have samples, position k
        # came from worker k % 2, so the record there must lie in that worker's shards
        owner = {i: w for w in (0, 1) for s in stream.worker_shards(w) for i in s.ids}
        per_worker = Counter(owner[records[i].id] for i in order)
        assert len(per_worker) == 2
        turns = 2 * min(per_worker.values())
        assert [owner[records[i].id] for i in order[:turns]] == [k % 2 for k in range(turns)]
    assert orders[0] != orders[1]  # shard order and shuffle buffer change with the epoch


def test_ranks_read_disjoint_shards_and_run_equal_whole_batches(files_dataset, sharded, model):
    records = labelled(read_manifest(files_dataset), "train")
    weights = [float(i) for i in range(len(records))]
    streams = [ShardStream(LocalShards(sharded), records, model, sample_weights=weights, batch_size=4,
                           num_workers=2, rank=r, world_size=2) for r in (0, 1)]
    # as training.fit loads it: batches made inside each worker, the last partial one dropped
    batches = [list(DataLoader(s, batch_size=4, num_workers=2, drop_last=True)) for s in streams]
    assert len(streams[0]) == len(streams[1]) > 0 and len(streams[0]) % 4 == 0
    for stream, got in zip(streams, batches):  # the steps len() promises, every batch whole
        assert len(got) == len(stream) // 4 and all(len(w) == 4 for _, _, w in got)
    seen = [[int(x) for _, _, w in got for x in w] for got in batches]
    names = [{s.name for s in stream.rank_shards(r)} for r, stream in enumerate(streams)]
    assert not names[0] & names[1] and names[0] | names[1] == {s.name for s in streams[0].shards}
    assert not set(seen[0]) & set(seen[1]) and all(len(set(s)) == len(s) for s in seen)
    # what is left out: the larger rank's excess and less than a batch per worker
    assert len(seen[0]) + len(seen[1]) >= len(records) - max(len(s.ids) for s in read_index(sharded)) - 2 * 2 * 3

    with pytest.raises(ShardError, match="fewer than the 99 ranks"):
        ShardStream(LocalShards(sharded), records, model, rank=0, world_size=99)
    with pytest.raises(ShardError, match="whole batch of 1000"):
        ShardStream(LocalShards(sharded), records, model, batch_size=1000)
    with pytest.raises(ShardError, match="made for 1 DataLoader worker"):
        list(DataLoader(ShardStream(LocalShards(sharded), records, model), num_workers=2))


def test_sharded_version_on_s3_streams_without_a_local_copy(files_dataset, sharded, model, s3_server,
                                                            s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/datasets"
    version = version_dataset(sharded, remote=remote, endpoint_url=s3_server)
    n_shards = len(read_index(sharded))
    # DVC tracks shards plus the top-level files, not one object per image and mask
    assert version.n_files == len(contents(sharded)) == n_shards + len(list(sharded.glob("*.json*")))
    objects = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["KeyCount"]
    assert objects == version.n_files + 1  # + the .dir listing
    assert len(contents(files_dataset)) > 2 * version.n_files

    records = labelled(read_manifest(files_dataset), "val")
    weights = [float(i) for i in range(len(records))]
    source = RemoteShards(version.md5, remote=remote, endpoint_url=s3_server)
    assert source.records() == read_manifest(files_dataset)
    reference = SegmentationDataset(files_dataset, records, model, sample_weights=weights)
    stream = ShardStream(source, records, model, sample_weights=weights, shuffle_buffer=4, num_workers=2)
    got = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert sorted(int(w) for _, _, w in got) == list(range(len(records)))
    for image, target, w in got:
        assert torch.equal(image, reference[int(w)][0]) and torch.equal(target, reference[int(w)][1])

    # a restore gives the files layout every step reads
    restored = restore_dataset(version.md5, tmp_path / "files", remote=remote, endpoint_url=s3_server)
    assert contents(restored) == contents(files_dataset)


def test_bad_inputs_are_named(files_dataset, sharded, model, tmp_path):
    # a file no record names would be lost in shards
    stray = tmp_path / "stray"
    stray.mkdir()
    for p in files_dataset.iterdir():
        (stray / p.name).symlink_to(p)
    (stray / "images").unlink()
    (stray / "images").mkdir()
    for p in (files_dataset / "images").iterdir():
        (stray / "images" / p.name).symlink_to(p)
    (stray / "images" / "orphan.png").write_bytes(b"x")
    with pytest.raises(ShardError, match="belong to no record.*orphan.png"):
        write_shards(stray, tmp_path / "out", SHARD_MB)
    assert not (tmp_path / "out").exists()

    # a corrupted shard is caught by the records' hashes, and no half dataset is left
    broken = tmp_path / "broken"
    write_shards(files_dataset, broken, SHARD_MB)
    shard = broken / SHARDS / read_index(broken)[0].name
    data = bytearray(shard.read_bytes())
    data[1024] ^= 0xFF  # inside the first sample's first file (after the 512-byte header)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="missing or corrupt"):
        unshard(broken, tmp_path / "unbroken")
    assert not (tmp_path / "unbroken").exists()

    # a truncated shard, one that is no tar at all, an index that promises more than a shard holds
    shard.write_bytes((sharded / SHARDS / shard.name).read_bytes()[:-4096])
    with pytest.raises(ShardError, match="not a readable WebDataset tar: unexpected end of data"):
        unshard(broken, tmp_path / "unbroken")
    shard.write_bytes(b"not a tar" * 200)
    with pytest.raises(ShardError, match="not a readable WebDataset tar"):
        unshard(broken, tmp_path / "unbroken")
    shard.write_bytes((sharded / SHARDS / shard.name).read_bytes())
    index = read_index(broken)
    index[0].ids.append("zzz_not_there")
    (broken / SHARD_INDEX).write_text("".join(s.model_dump_json() + "\n" for s in index))
    with pytest.raises(ShardError, match="holds .* samples, shards.jsonl says"):
        unshard(broken, tmp_path / "unbroken")
    assert not (tmp_path / "unbroken").exists()

    weak = [r for r in read_manifest(files_dataset) if r.mask is None]
    with pytest.raises(ShardError, match=f"have no mask to train on, e.g. {weak[0].id}"):
        ShardStream(LocalShards(sharded), weak, model)
    with pytest.raises(ShardError, match=f"no {SHARD_INDEX}"):
        LocalShards(files_dataset)
    with pytest.raises(DatasetVersionError, match="is not on remote"):
        RemoteShards("0123456789abcdef0123456789abcdef.dir", remote=str(tmp_path))
    with pytest.raises(ShardError, match="shard_mb must be positive"):
        write_shards(files_dataset, tmp_path / "zero", 0)


def test_ingest_step_with_layout_shards_versions_shards(tmp_path):
    """``ingest.layout: shards``: the step's dataset stays files, its DVC version holds shards, and
    restoring that version gives the step's dataset back."""
    import mlflow

    from lesionflow import tracking
    from lesionflow.config import Params
    from lesionflow.steps import ingest as ingest_step

    params = (Params().with_section("runtime", workdir=str(tmp_path / "work"))
              .with_section("synthetic", n_images=12, n_videos=0, n_weak=0, size=48)
              .with_section("ingest", layout="shards", shard_mb=0.01))
    tracking.connect(params)
    with mlflow.start_run():
        outcome = ingest_step.run(params, tmp_path / "dataset")
    index = RemoteShards(outcome.version.md5, remote=params.runtime.remote()).index()  # a folder remote
    top_level = [p for p in (tmp_path / "dataset").iterdir() if p.is_file()]  # manifest, fingerprint, report
    assert len(index) >= 3 and outcome.version.n_files == len(index) + len(top_level) + 1  # + shards.jsonl
    assert (tmp_path / "dataset" / "images").is_dir()  # what the next steps read
    restored = restore_dataset(outcome.version.md5, tmp_path / "files", remote=params.runtime.remote())
    assert contents(restored) == contents(tmp_path / "dataset")


def _files_under(root: Path) -> set[str]:
    import hashlib

    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def pushed_sharded(sharded, s3_server) -> tuple[str, str]:
    """``sharded`` pushed once with the real `dvc` to a bucket of its own: (remote, version md5)."""
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="t-pushed-sharded")
    remote = "s3://t-pushed-sharded/datasets"
    return remote, version_dataset(sharded, remote=remote, endpoint_url=s3_server).md5


@pytest.mark.parametrize("nproc", [1, 2])
def test_trainjob_worker_streams_a_sharded_version_and_keeps_only_val_on_disk(
        files_dataset, pushed_sharded, s3_server, s3_bucket, tmp_path, monkeypatch, nproc):
    """``lesionflow train-worker`` on a sharded version (plain training): it trains and uploads a
    model while no train image ever reaches the worker's disk — only the manifest, fingerprint and
    val split do — alone in-process, and as 2 torchrun ranks, each streaming its own shards."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from lesionflow import config, trainjob
    from lesionflow.distributed import RESULT_FILE
    from lesionflow.models.store import load_model
    from tests.conftest import free_port

    remote, md5 = pushed_sharded
    params = config.load(None, [
        f"runtime.dvc_remote={remote}", f"runtime.s3_endpoint_url={s3_server}", "train.image_size=32",
        "train.batch_size=4", "train.epochs=1", "train.device=cpu", "model.base_channels=4",
        "model.depth=2", "meta_train.enabled=false"])
    output, scratch, tmp = f"s3://{s3_bucket}/out", tmp_path / "scratch", tmp_path / "tmp"
    tmp.mkdir()
    if nproc == 1:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        trainjob.work(params, md5, output, scratch=scratch)
    else:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
        worker = subprocess.run(
            ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", "--no-python", "lesionflow",
             "train-worker", "--params-json", params.model_dump_json(), "--dataset-md5", md5,
             "--output", output, "--scratch", str(scratch)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert worker.returncode == 0, worker.stderr[-5000:]

    trainjob.download_model(output, tmp_path / "model", s3_server, remove=False)
    assert load_model(tmp_path / "model")(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    result = json.loads((tmp_path / "model" / RESULT_FILE).read_text())
    assert (result["training"], result["world_size"]) == ("plain", nproc) and "train_loss" in result["metrics"]

    records = read_manifest(files_dataset)
    on_disk = _files_under(scratch) | _files_under(tmp)
    train_images = {r.image_sha256 for r in labelled(records, "train")}
    val_images = {r.image_sha256 for r in labelled(records, "val")}
    assert val_images <= on_disk, "the val split is not on the worker's disk"
    assert not train_images & on_disk, "train images reached the worker's disk"
    assert sorted(p.name for p in scratch.iterdir() if not p.name.startswith(".")) == [
        md5.removesuffix(".dir") + "-val"]
