"""The pipeline against the services a cluster uses: a real `mlflow server` over HTTP for
tracking and the registry, and an S3 DVC remote on a moto server — then rollback over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
import mlflow
import pytest

from lesionflow import lineage, registry
from lesionflow.versioning import restore_dataset
from tests.conftest import REPO
from tests.test_pipeline import TINY


@pytest.mark.slow
def test_pipeline_with_mlflow_server_and_s3_remote(tmp_path, mlflow_server, s3_server, s3_bucket):
    runtime = [f"runtime.workdir={tmp_path / 'work'}", f"runtime.mlflow_tracking_uri={mlflow_server}",
               f"runtime.dvc_remote=s3://{s3_bucket}/datasets", f"runtime.s3_endpoint_url={s3_server}",
               "runtime.model_name=remote-segmenter"]
    args = [a for item in TINY + runtime for a in ("--set", item)]
    for epochs in ("2", "1"):
        proc = subprocess.run(
            [sys.executable, "-m", "lesionflow.cli", "run", "--params", str(REPO / "params.yaml"),
             *args, "--set", f"train.epochs={epochs}"],
            cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"MLflow           {mlflow_server}" in proc.stdout

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
            .list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys and all(k.startswith("datasets/") for k in keys)

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    name = "remote-segmenter"
    info = registry.version_info(name, "2")
    md5 = info["tags"][lineage.TAG_DATASET_MD5]
    # the lineage hash alone brings the exact training data back from S3
    restored = restore_dataset(md5, tmp_path / "restored", remote=f"s3://{s3_bucket}/datasets",
                               endpoint_url=s3_server)
    assert (restored / "manifest.jsonl").is_file()

    registry.move_alias(name, "champion", "2", why="test setup", action="set")
    move = registry.rollback(name, why="test over HTTP")
    assert (move.from_version, move.to_version) == ("2", "1")
    assert registry.champion_version(name) == "1"
    assert [m.action for m in registry.history(name)][-1] == "rollback"
