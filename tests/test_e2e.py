"""The whole loop with the real CLI, as a user on a fresh checkout runs it: pipeline → serve the
champion → a deliberately worse candidate is refused (champion, history and server stay put) →
reviewers correct some → `retrain` waits for enough → a warm-started version with the corrections
in its lineage passes the gate → `rollback` → the server answers with the restored champion after
a reload. And two retrains started at once against a real MLflow server: one trains, the other
stops with a message naming the holder of the training lease."""

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

import mlflow
import numpy as np
import pytest
from PIL import Image

from lesionflow import config, lineage, registry, tracking
from lesionflow import lease as lease_module
from lesionflow.data import synthetic
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.steps.entrypoints import PIPELINE_LEASE
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


RELOAD_TOKEN = "e2e-token"


def post(url: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
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


# enough outer steps for a champion clearly better than an untrained network
TRAINED = ("meta_train.enabled=true", "meta_train.outer_steps=30")
# the same pipeline with one tiny outer step: a candidate the gate must refuse
UNTRAINED = ("meta_train.enabled=true", "meta_train.outer_steps=1", "meta_train.outer_lr=0.000001")


@pytest.mark.slow
def test_serve_refuse_correct_retrain_rollback(tmp_path):
    workdir = tmp_path / "work"
    out = lesionflow(workdir, "run", extra=TRAINED)
    assert "registered       lesionflow-segmenter v1" in out

    # device images the model never saw: another synthetic draw
    source = synthetic.make_synthetic_source(
        config.load(REPO / "params.yaml", ["synthetic.seed=7"]).synthetic, tmp_path / "device")
    stills = sorted((source / "images").glob("still_*.png"))[:6]

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LESIONFLOW_RELOAD_TOKEN": RELOAD_TOKEN}
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

        # a deliberately worse candidate: registered (the attempt is recorded) but refused
        worse = lesionflow(workdir, "run", extra=UNTRAINED)
        assert "registered       lesionflow-segmenter v2" in worse
        assert "gate             refused: candidate dice=" in worse and "champion         v1" in worse
        assert re.search(r"compared on      \d+ test records neither model has seen", worse)
        assert re.search(r"refuse +champion: v2 refused, stays 1 .*candidate dice=", lesionflow(workdir, "history"))
        time.sleep(3)  # three follow periods: the server must not have moved
        assert get(f"{base}/health")["version"] == "1"
        assert post(f"{base}/predict", stills[0].read_bytes(), "image/png")["version"] == "1"

        # three corrections are not enough for --min-corrections 5: nothing starts
        added = lesionflow(workdir, "corrections", "add", "--reviewer", "dr-who", "--source",
                           str(reviewer_batch(tmp_path / "batch1", stills[:3], source / "masks", "1")))
        assert "holds 3 correction(s)" in added
        waited = lesionflow(workdir, "retrain", "--min-corrections", "5")
        assert "nothing to do: 3 new correction(s) since the last attempt v2; need at least 5" in waited
        assert "registered" not in waited

        added = lesionflow(workdir, "corrections", "add", "--reviewer", "dr-who", "--source",
                           str(reviewer_batch(tmp_path / "batch2", stills[3:], source / "masks", "1")))
        corrections_md5 = re.search(r"version (\S+) holds 6 correction", added).group(1)
        # warm-started from the champion; a generous gate so there is something to roll back
        retrained = lesionflow(workdir, "retrain", "--min-corrections", "5", "--warm-start",
                               extra=("registry.tolerance=1.0", "registry.max_type_drop=1.0"))
        assert "starting: 6 new correction(s) since the last attempt v2" in retrained
        assert "registered       lesionflow-segmenter v3" in retrained
        assert "champion         v3" in retrained

        tracking.connect(config.load(REPO / "params.yaml", [f"runtime.workdir={workdir}"]))
        tags = registry.version_info("lesionflow-segmenter", "3")["tags"]
        assert tags[lineage.TAG_CORRECTIONS_MD5] == corrections_md5
        assert tags[lineage.TAG_PARENT_VERSION] == "1" and tags[lineage.TAG_INIT_FROM_VERSION] == "1"
        trained_on = registry.version_artifact("lesionflow-segmenter", "3", lineage.RECORDS_ARTIFACT)
        assert {r["labelled_by"] for r in trained_on if r["kind"] == "correction"} == {"reviewer:dr-who"}
        # nothing new since v3 was trained on all six
        assert "nothing to do: 0 new correction(s) since the last attempt v3" in lesionflow(
            workdir, "retrain", "--min-corrections", "1")

        # the server follows the promotion on its own (serve.follow_seconds)
        deadline = time.time() + 60
        while get(f"{base}/health")["version"] != "3" and time.time() < deadline:
            time.sleep(0.5)
        assert post(f"{base}/predict", stills[0].read_bytes(), "image/png")["version"] == "3"
        assert "v3 → v1" in lesionflow(workdir, "rollback")
        post(f"{base}/reload", b"", "application/json", {"Authorization": f"Bearer {RELOAD_TOKEN}"})
        answer = post(f"{base}/predict", stills[0].read_bytes(), "image/png")
        assert answer["version"] == "1"
        assert np.isclose(answer["confidence"], answers[0]["confidence"])  # the same v1 weights
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_two_retrains_started_at_once_train_once(tmp_path, mlflow_server):
    """Two scheduler ticks fire together against a real tracking server (real processes, each its
    own workdir, one DVC remote): exactly one pipeline trains and registers; the other stops with
    a message naming the holder of the model's training lease, and exits 0 (nothing to do)."""
    shared = [f"runtime.mlflow_tracking_uri={mlflow_server.url}", "runtime.model_name=ticks",
              f"runtime.dvc_remote={tmp_path / 'remote'}"]
    params = config.load(REPO / "params.yaml", [*TINY, *shared, f"runtime.workdir={tmp_path / 'setup'}"])
    tracking.connect(params)
    with mlflow.start_run():  # the version reviewers corrected
        registry.register_model(Segmenter(UNet(3, 4, 2), 64, [0.0] * 3, [1.0] * 3), name="ticks",
                                metrics={}, lineage={lineage.TAG_DATASET_MD5: "0" * 32 + ".dir",
                                                     lineage.TAG_PARAMS_HASH: "p", lineage.TAG_PIPELINE_RUN_ID: "r"})
    source = synthetic.make_synthetic_source(params.synthetic.model_copy(update={"seed": 7}),
                                           tmp_path / "device")
    stills = sorted((source / "images").glob("still_*.png"))[:2]
    lesionflow(tmp_path / "setup", "corrections", "add", "--source",
               str(reviewer_batch(tmp_path / "batch", stills, source / "masks", "1")), extra=tuple(shared))

    def tick(name: str) -> subprocess.Popen:
        sets = [f"runtime.workdir={tmp_path / name}", *TINY, *shared]
        cmd = [sys.executable, "-m", "lesionflow.cli", "retrain", "--min-corrections", "1",
               "--params", str(REPO / "params.yaml"), *[a for s in sets for a in ("--set", s)]]
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ticks = [tick("a"), tick("b")]
    outputs = [p.communicate(timeout=900)[0] for p in ticks]
    assert [p.returncode for p in ticks] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    trained = [o for o in outputs if "registered       ticks v2" in o]
    stopped = [o for o in outputs if "nothing to do" in o and "lease" in o]
    assert len(trained) == 1 and len(stopped) == 1, "\n\n".join(o[-3000:] for o in outputs)
    assert registry.newest_version("ticks") == "2"
    assert lease_module.current("ticks", PIPELINE_LEASE) is None  # released by register
