"""The whole loop with the real CLI, as a user on a fresh checkout runs it: pipeline → serve the
champion → send images → reviewers correct some → `retrain` waits for enough → a new version with
the corrections in its lineage passes the gate → `rollback` → the server answers with the restored
champion after a reload."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionflow import config, registry, tracking
from lesionflow.data import synthetic
from tests.conftest import REPO, free_port, wait_http
from tests.test_pipeline import TINY


def lesionflow(workdir: Path, *args: str, extra: tuple[str, ...] = ()) -> str:
    """Run the CLI in a subprocess with the tiny settings; return its stdout (fail loudly)."""
    sets = [f"runtime.workdir={workdir}", *TINY, *extra]
    cmd = [sys.executable, "-m", "lesionflow.cli", *args, "--params", str(REPO / "params.yaml")]
    cmd += [item for s in sets for item in ("--set", s)]
    proc = subprocess.run(cmd, cwd=workdir.parent, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def reviewer_batch(root: Path, stills: list[Path], masks_dir: Path, version: str) -> Path:
    """What a reviewer tool exports: the images, corrected masks, and who predicted them."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "corrections.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "model_version"])
        for image in stills:
            (root / "images" / image.name).write_bytes(image.read_bytes())
            (root / "masks" / image.name).write_bytes((masks_dir / image.name).read_bytes())
            writer.writerow([image.stem, version])
    return root


@pytest.mark.slow
def test_serve_correct_retrain_rollback(tmp_path):
    workdir = tmp_path / "work"
    out = lesionflow(workdir, "run")
    assert "registered       lesionflow-segmenter v1" in out

    # device images the model never saw: another synthetic draw
    source = synthetic.make_synthetic_source(config.load(REPO / "params.yaml").synthetic,
                                             tmp_path / "device", seed=7)
    stills = sorted((source / "images").glob("still_*.png"))[:6]

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "lesionflow.cli", "serve", "--port", str(port), "--params",
         str(REPO / "params.yaml"), "--set", f"runtime.workdir={workdir}",
         "--set", "serve.follow_seconds=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/ping", timeout=120, proc=server)
        answers = [post(f"{base}/predict", still.read_bytes(), "image/png") for still in stills]
        assert {a["version"] for a in answers} == {"1"}
        size = Image.open(stills[0]).size
        assert all((a["width"], a["height"]) == size for a in answers)

        # three corrections are not enough for --min-corrections 5: nothing starts
        added = lesionflow(workdir, "corrections", "add", "--source",
                           str(reviewer_batch(tmp_path / "batch1", stills[:3], source / "masks", "1")))
        assert "holds 3 correction(s)" in added
        waited = lesionflow(workdir, "retrain", "--min-corrections", "5")
        assert "nothing to do: 3 new correction(s) since champion v1; need at least 5" in waited
        assert "registered" not in waited

        added = lesionflow(workdir, "corrections", "add", "--source",
                           str(reviewer_batch(tmp_path / "batch2", stills[3:], source / "masks", "1")))
        corrections_md5 = re.search(r"version (\S+) holds 6 correction", added).group(1)
        # a generous gate so the retrained model is promoted and there is something to roll back
        retrained = lesionflow(workdir, "retrain", "--min-corrections", "5",
                               extra=("registry.tolerance=1.0",))
        assert "starting: 6 new correction(s) since champion v1" in retrained
        assert "registered       lesionflow-segmenter v2" in retrained
        assert "champion         v2" in retrained

        tracking.connect(config.load(REPO / "params.yaml", [f"runtime.workdir={workdir}"]))
        tags = registry.version_info("lesionflow-segmenter", "2")["tags"]
        assert tags[registry.TAG_CORRECTIONS_MD5] == corrections_md5
        assert tags[registry.TAG_PARENT_VERSION] == "1"
        # nothing new since v2 was trained on all six
        assert "nothing to do: 0 new correction(s) since champion v2" in lesionflow(
            workdir, "retrain", "--min-corrections", "1")

        # the server follows the promotion on its own (serve.follow_seconds)
        deadline = time.time() + 60
        while get(f"{base}/health")["version"] != "2" and time.time() < deadline:
            time.sleep(0.5)
        assert post(f"{base}/predict", stills[0].read_bytes(), "image/png")["version"] == "2"
        assert "v2 → v1" in lesionflow(workdir, "rollback")
        post(f"{base}/reload", b"", "application/json")
        answer = post(f"{base}/predict", stills[0].read_bytes(), "image/png")
        assert answer["version"] == "1"
        assert np.isclose(answer["confidence"], answers[0]["confidence"])  # the same v1 weights
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
