"""`dvc repro` rebuilds the canonical dataset from dvc.yaml + params.yaml with the same code as the
pipeline's ingest step, and DVC gives it the same identity the pipeline records."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lesionflow import config
from lesionflow.steps.ingest import build_dataset
from lesionflow.versioning import version_dataset
from tests.conftest import REPO

SMALL = {"synthetic": {"n_images": 12, "n_videos": 1, "frames_per_video": 3, "size": 48}}


def dvc(*args: str, cwd: Path) -> str:
    exe = Path(sys.executable).parent / "dvc"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def test_dvc_repro_reproduces_the_pipeline_dataset(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copytree(REPO / "lesionflow" / "data", project / "lesionflow" / "data")  # a stage dep
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synthetic"].update(SMALL["synthetic"])
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc("init", "-q", cwd=project)

    dvc("repro", cwd=project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    repro_md5 = lock["stages"]["ingest"]["outs"][0]["md5"]
    assert (project / "data" / "dataset" / "manifest.jsonl").is_file()
    assert "didn't change" in dvc("repro", cwd=project) or "up to date" in dvc("status", cwd=project)

    same = config.load(project / "params.yaml")
    build_dataset(same, tmp_path / "pipeline-dataset")
    version = version_dataset(tmp_path / "pipeline-dataset", remote=str(tmp_path / "remote"))
    assert version.md5 == repro_md5
