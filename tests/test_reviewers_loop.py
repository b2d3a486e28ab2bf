"""The reviewers' loop end to end, as issue 14 states it: `lesionflow serve` → predictions →
`review next` picks from the log → corrections in Label Studio's format → `retrain
--min-corrections` starts a run.

Every step is the real thing in its own process: a `lesionflow serve` process keeping images,
the CLI for each command, an `mlflow server` over HTTP and a moto S3 server as the DVC remote
(the cluster setting, which `retrain --host` requires), and a local stand-in for the KFP REST API
that records the submitted run. The one hand-made step is the reviewers' work in Label Studio:
annotations stored the way its JSON export stores them (``completed_by``, brush RLE written by
Label Studio's own encoder).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import subprocess
import sys

import boto3
import numpy as np
import pytest
import requests
from label_studio_converter import brush
from PIL import Image

from lesionflow import corrections, retrain, tracking
from lesionflow.data.manifest import read_manifest
from tests.conftest import REPO
from tests.test_review import logged, noise, png, registered, server  # noqa: F401  (fixtures)
from tests.test_submit import FakeKFP, kfp_host  # noqa: F401  (fixture: the KFP REST stand-in)

# seed → the lesion type the client names: any 3 of the 4 hold one of each kind
SENT = {300: "polyp", 301: None, 302: "polyp", 303: None}
K = 3  # images in the review batch


@pytest.fixture(scope="module")
def review_store(mlflow_server, s3_server) -> list[str]:
    """The cluster setting for `registered` and `server`: tracking server and S3 DVC remote."""
    bucket = "reviewers-loop"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return [f"runtime.mlflow_tracking_uri={mlflow_server}", f"runtime.dvc_remote=s3://{bucket}/datasets",
            f"runtime.s3_endpoint_url={s3_server}"]


def square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


@pytest.mark.slow
def test_served_predictions_reviewed_in_label_studio_start_a_retrain(server, registered, kfp_host, tmp_path):
    _, cli_args, params = registered
    env = {**os.environ, "LESIONFLOW_USER": "fallback-reviewer"}  # who adds; not who reviewed

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "lesionflow.cli", *args, "--params", str(REPO / "params.yaml"),
                               *cli_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    # 1. clients ask the server; it answers with model v1 and logs each answer with its image
    answers = {}
    for seed, lesion_type in SENT.items():
        reply = requests.post(f"{server}/predict", data=png(noise(seed)), timeout=30,
                              params={"lesion_type": lesion_type} if lesion_type else {},
                              headers={"Content-Type": "image/png"})
        assert reply.status_code == 200, reply.text
        answers[reply.json()["request_id"]] = (seed, reply.json())
    assert {a["version"] for _, a in answers.values()} == {"1"}
    assert {r.request_id for r in logged(params, len(SENT))} == set(answers)

    # 2. the review queue picks K of them from the log, with the served masks as pre-annotations
    batch_dir = tmp_path / "batch"
    out = cli("review", "next", "--from", "predictions", "--n", str(K), "--out", str(batch_dir))
    assert f"{K} of {len(SENT)} candidates for review" in out
    batch = json.loads((batch_dir / "batch.json").read_text())
    assert batch["model_version"] == "1" and len(batch["items"]) == K
    for item in batch["items"]:
        seed, answer = answers[item["source"].removeprefix("prediction:")]
        assert item["lesion_type"] == SENT[seed]
        assert np.array_equal(np.asarray(Image.open(batch_dir / item["image"])), noise(seed))
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"]))))
        assert np.array_equal(np.asarray(Image.open(batch_dir / item["prediction"])), served)

    # 3. out to Label Studio
    ls = tmp_path / "label-studio"
    assert "read back and verified" in cli("review", "export", "--batch", str(batch_dir), "--format",
                                           "label-studio", "--out", str(ls))
    tasks = json.loads((ls / "tasks.json").read_text())
    assert [t["data"]["lesionflow_id"] for t in tasks] == [i["id"] for i in batch["items"]]

    # 4. the reviewers in Label Studio: ann paints a square onto a polyp's mask, user 4 erases
    # the mask of an image sent without a lesion type, nobody opens the third; then Export →
    # JSON into the same folder
    typed = next(t for t in tasks if t["data"]["lesion_type"] == "polyp")
    untyped = next(t for t in tasks if t["data"]["lesion_type"] is None)
    shape = noise(0).shape[:2]
    first = typed["predictions"][0]["result"][0]  # an annotation starts as a copy of the prediction
    assert first["value"]["brushlabels"] == ["polyp"]
    painted = brush.decode_rle(bytes(first["value"]["rle"])).reshape(*shape, 4)[:, :, 3] > 127
    edited = {typed["data"]["lesionflow_id"]: painted | square(shape, 30, 40, 12),
              untyped["data"]["lesionflow_id"]: np.zeros(shape, bool)}
    stroke = copy.deepcopy(first)
    stroke["value"]["rle"] = brush.mask2rle(edited[typed["data"]["lesionflow_id"]].astype(np.uint8) * 255)
    typed["annotations"] = [{"id": 11, "completed_by": {"id": 3, "email": "ann@example.org"},
                             "was_cancelled": False, "updated_at": "2026-11-29T16:00:00Z", "result": [stroke]}]
    untyped["annotations"] = [{"id": 12, "completed_by": 4, "was_cancelled": False,
                               "updated_at": "2026-11-29T16:01:00Z", "result": []}]
    for n, task in enumerate(tasks, 1):
        task["id"] = n
    (ls / "project-1-at-2026-11-29-16-05.json").write_text(json.dumps(tasks))

    # 5. back in as a corrections version
    out = cli("corrections", "add", "--source", str(ls), "--format", "label-studio")
    assert "holds 2 correction(s)" in out
    tracking.connect(params)
    version = corrections.latest(params)
    assert version.md5 in out
    restored = corrections.restore(params, version.md5, tmp_path / "restored")
    stored = {r.id.removeprefix(corrections.ID_PREFIX): r for r in read_manifest(restored)}
    assert set(stored) == set(edited)
    reviewers = {typed["data"]["lesionflow_id"]: "reviewer:ann@example.org",
                 untyped["data"]["lesionflow_id"]: "reviewer:label-studio-user-4"}
    items = {i["id"]: i for i in batch["items"]}
    for item_id, record in stored.items():
        seed, answer = answers[items[item_id]["source"].removeprefix("prediction:")]
        assert np.array_equal(np.asarray(Image.open(restored / record.mask)) > 0, edited[item_id])
        assert np.array_equal(np.asarray(Image.open(restored / record.image)), noise(seed))
        assert record.labelled_by == reviewers[item_id]
        assert record.corrected_from == answer["version"] == "1"
        assert record.lesion_type == (SENT[seed] or params.ingest.default_lesion_type)

    # 6. the schedule's tick: one correction short of the threshold it waits (the decision
    # `retrain` prints, taken in-process: a CLI start costs ~7 s); at it, a KFP run on exactly
    # this corrections version
    waits = retrain.decide(params, 3)
    assert (waits.start, waits.new_corrections, waits.corrections_md5) == (False, 2, version.md5)
    out = cli("retrain", "--min-corrections", "2", "--host", kfp_host)
    assert "retrain: starting: 2 new correction(s) since the last attempt v1" in out
    assert f"submitted run run-42 to {kfp_host}" in out
    (run,) = [body for method, path, body in FakeKFP.requests if (method, path) == ("POST", "/apis/v2beta1/runs")]
    sent = json.loads(run["runtime_config"]["parameters"]["params_json"])
    assert sent["corrections"]["dataset"] == version.md5
    assert sent["runtime"]["model_name"] == "reviewed"
    assert sent["runtime"]["mlflow_tracking_uri"] == params.runtime.mlflow_tracking_uri
