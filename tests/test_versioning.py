"""DVC dataset versioning against a real `dvc` CLI: local folder remote and S3 (moto server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lesionflow.errors import DatasetVersionError
from lesionflow.versioning import restore_dataset, version_dataset

UNKNOWN = "0123456789abcdef0123456789abcdef.dir"


def make_dataset(root: Path, seed: int = 0, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n):
        rid = f"case{i:02d}"
        (root / "images" / f"{rid}.png").write_bytes(b"\x89PNG\r\n" + bytes([seed, i]) * 300)
        (root / "masks" / f"{rid}.png").write_bytes(b"\x89PNG\r\n" + bytes([i, seed, 255]) * 50)
        lines.append(json.dumps({"id": rid, "image": f"images/{rid}.png", "mask": f"masks/{rid}.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "fingerprint.json").write_text(json.dumps({"n": n, "seed": seed}))
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, mode and mtime: what "the dataset directory is unchanged" means."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def contents(root: Path) -> dict[str, bytes]:
    return {k: v[0] for k, v in snapshot(root).items()}


def remote_files(remote: Path) -> dict[str, int]:
    return {str(p.relative_to(remote)): p.stat().st_mtime_ns for p in remote.rglob("*") if p.is_file()}


def test_local_round_trip_leaves_dataset_untouched(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    before = snapshot(ds)

    version = version_dataset(ds, remote=str(tmp_path / "remote"))

    assert version.md5.endswith(".dir") and len(version.md5) == 36
    assert version.n_files == 8 and version.size == sum(len(b) for b, _, _ in before.values())
    assert version.remote == str(tmp_path / "remote")
    assert f"md5: {version.md5}" in version.dvc_file
    assert snapshot(ds) == before  # same files, bytes, modes, mtimes: nothing added or chmodded
    assert all(os.stat(ds / f).st_nlink == 1 for f in before)  # workspace hardlinks are gone

    restored = restore_dataset(version.md5, tmp_path / "restored", remote=str(tmp_path / "remote"))
    assert restored == tmp_path / "restored"
    assert contents(restored) == contents(ds)
    assert all(os.access(p, os.W_OK) for p in restored.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "remote", "restored"]


def test_hash_is_content_addressed_and_old_versions_stay_restorable(tmp_path):
    remote, ws = tmp_path / "remote", tmp_path / "workdir" / "dvc-workspace"
    ds = make_dataset(tmp_path / "ds")
    v1_contents = contents(ds)
    v1 = version_dataset(ds, remote=str(remote), workspace=ws)

    copy = version_dataset(make_dataset(tmp_path / "copy"), remote=str(remote))
    assert copy.md5 == v1.md5

    pushed = remote_files(remote)
    again = version_dataset(ds, remote=str(remote), workspace=ws)
    assert again.md5 == v1.md5
    assert remote_files(remote) == pushed  # nothing re-pushed
    assert not (ws / "data").exists()  # no links into the artifact outlive the call

    # In-place edit: the shared cache must not have been hardlinked to the dataset's inodes.
    with open(ds / "masks" / "case01.png", "r+b") as f:
        f.write(b"edited")
    v2 = version_dataset(ds, remote=str(remote), workspace=ws)
    assert v2.md5 != v1.md5

    old = restore_dataset(v1.md5, tmp_path / "v1", remote=str(remote))
    new = restore_dataset(v2.md5, tmp_path / "v2", remote=str(remote))
    assert contents(old) == v1_contents
    assert contents(new) == contents(ds) != v1_contents


def test_s3_remote_round_trip(tmp_path, s3_server, s3_bucket):
    import boto3

    ds = make_dataset(tmp_path / "ds", seed=7)
    remote = f"s3://{s3_bucket}/datasets"

    version = version_dataset(ds, remote=remote, endpoint_url=s3_server)

    assert version.remote == remote
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)
    keys = {o["Key"] for o in listed.get("Contents", [])}
    digest = version.md5.removesuffix(".dir")
    assert f"datasets/files/md5/{digest[:2]}/{digest[2:]}.dir" in keys
    assert len(keys) == version.n_files + 1  # every file plus the directory listing

    restored = restore_dataset(version.md5, tmp_path / "fresh", remote=remote, endpoint_url=s3_server)
    assert contents(restored) == contents(ds)


def test_unknown_hash_is_a_clear_error(tmp_path):
    version_dataset(make_dataset(tmp_path / "ds"), remote=str(tmp_path / "remote"))
    dest = tmp_path / "out" / "restored"

    with pytest.raises(DatasetVersionError, match=f"{UNKNOWN} is not .* on remote") as err:
        restore_dataset(UNKNOWN, dest, remote=str(tmp_path / "remote"))
    assert "dvc pull" in str(err.value)  # carries the command and dvc's own output
    assert list(dest.parent.iterdir()) == []  # no dest, no leftover temp workspace

    with pytest.raises(DatasetVersionError, match="not a DVC directory hash"):
        restore_dataset("abc", dest, remote=str(tmp_path / "remote"))


def test_failed_pull_leaves_no_half_written_dest(tmp_path):
    remote = tmp_path / "remote"
    ds = make_dataset(tmp_path / "ds")
    version = version_dataset(ds, remote=str(remote))
    victim = next(p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    victim.unlink()  # the listing is there, one file is not: the pull fails midway

    dest = tmp_path / "out" / "restored"
    with pytest.raises(DatasetVersionError, match="dvc pull data.dvc"):
        restore_dataset(version.md5, dest, remote=str(remote))
    assert list(dest.parent.iterdir()) == []


def test_refuses_to_overwrite_and_rejects_bad_inputs(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    version = version_dataset(ds, remote=str(tmp_path / "remote"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")

    with pytest.raises(DatasetVersionError, match="not empty"):
        restore_dataset(version.md5, occupied, remote=str(tmp_path / "remote"))
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty pre-created output directory is fine
    assert contents(restore_dataset(version.md5, empty, remote=str(tmp_path / "remote"))) == contents(ds)

    with pytest.raises(DatasetVersionError, match="does not exist"):
        version_dataset(tmp_path / "missing", remote=str(tmp_path / "remote"))
    with pytest.raises(DatasetVersionError, match="only valid for s3://"):
        version_dataset(ds, remote=str(tmp_path / "remote"), endpoint_url="http://127.0.0.1:1")


def test_failing_dvc_command_reports_command_and_stderr(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    remote = tmp_path / "remote-is-a-file"
    remote.write_text("not a directory")
    before = snapshot(ds)

    with pytest.raises(DatasetVersionError, match=r"(?s)`dvc push data\.dvc` failed .*\n.+") as err:
        version_dataset(ds, remote=str(remote))
    assert "ERROR" in str(err.value)
    assert snapshot(ds) == before
