"""Serving: the real `lesionflow serve` process against a real MLflow store, over real HTTP.

One server for the module (start-up costs seconds): v1 is a single model, v2 one model per lesion
type; v2 is champion until the last test rolls back to v1 with the real `lesionflow rollback`.
Masks are compared with the same version loaded in-process; pixels whose probability lies within
1e-4 of the threshold may flip between processes (thread counts change float sums) and are skipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools.coco import COCO

from lesionflow import config, lineage, registry, tracking
from lesionflow.cli import main
from lesionflow.models.pyfunc import decode_rle
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from tests.conftest import REPO, free_port, wait_http

MAX_BYTES, MAX_SIDE = 64 * 1024, 512
LESIONFLOW = [str(Path(sys.executable).parent / "lesionflow")]  # the installed command


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def segmenter(seed: int) -> Segmenter:
    """An untrained model whose logits on IMAGE are rescaled to median 0 and spread 4: its mask is
    neither empty nor full, and few pixels sit at the threshold."""
    torch.manual_seed(seed)
    model = Segmenter(UNet(3, 4, 1), 16, mean=[120.0] * 3, std=[60.0] * 3).eval()
    with torch.no_grad():
        logits = model(torch.tensor(model.prepare(IMAGE)[None], dtype=torch.float32))
        scale = 4 / logits.std()
        model.net.head.weight *= scale
        model.net.head.bias.copy_((model.net.head.bias - logits.median()) * scale)
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, overrides for CLI calls, registered name): v1 single, v2 per-type and champion."""
    root = tmp_path_factory.mktemp("serving")
    overrides = [f"runtime.workdir={root}", f"runtime.mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}",
                 "runtime.model_name=served", f"serve.max_upload_bytes={MAX_BYTES}",
                 f"serve.max_side={MAX_SIDE}", "serve.follow_seconds=null"]  # /reload only
    params = config.load(REPO / "params.yaml", overrides)
    old_uri = mlflow.get_tracking_uri()
    tracking.connect(params)
    tags = {lineage.TAG_DATASET_MD5: "d.dir", lineage.TAG_PARAMS_HASH: "p", lineage.TAG_PIPELINE_RUN_ID: "r"}
    for model in (segmenter(1), LesionTypeRouter({"round": segmenter(2), "elongated": segmenter(3)})):
        with mlflow.start_run():
            version = registry.register_model(model, name="served", lineage=tags, metrics={})
        registry.move_alias("served", "champion", version, why="test", action="promote")
    mlflow.set_tracking_uri(old_uri)

    port = free_port()
    cli_args = [a for o in overrides for a in ("--set", o)]
    with open(root / "serve.log", "w") as log:
        proc = subprocess.Popen([*LESIONFLOW, "serve", "--port", str(port), *cli_args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", timeout=90, proc=proc)
        yield url, cli_args, params
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def in_process(params, version: str, lesion_type: str | None):
    """(probabilities, mask, confidence) of ``version`` loaded here, not in the server."""
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(params.runtime.tracking_uri())
    try:
        model = registry.load_pyfunc("served", version)
    finally:
        mlflow.set_tracking_uri(old)
    inner = model.model.route(lesion_type) if lesion_type else model.model
    prob = inner.predict_proba([IMAGE])[0]
    pred = model.segment(IMAGE, lesion_type)
    return prob, pred.mask, pred.confidence


def served_mask(answer: dict) -> np.ndarray:
    if answer["mask"]["format"] == "rle":
        return decode_rle(answer["mask"])
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]["data"])))) > 0


def assert_same_mask(served: np.ndarray, prob: np.ndarray, expected: np.ndarray) -> None:
    decided = np.abs(prob - 0.5) > 1e-4
    assert served.shape == expected.shape == IMAGE.shape[:2]
    assert np.array_equal(served[decided], expected[decided]) and decided.mean() > 0.99
    assert 0.05 < expected.mean() < 0.95


def test_predict_answers_with_the_champions_mask_confidence_and_version(server):
    url, _, params = server
    health = requests.get(f"{url}/health", timeout=10).json()
    assert (health["version"], health["lesion_types"]) == ("2", ["elongated", "round"])

    raw = requests.post(f"{url}/predict", params={"lesion_type": "round"}, data=png(IMAGE),
                        headers={"Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert (body["model"], body["version"], body["lesion_type"]) == ("served", "2", "round")
    mask = served_mask(body)
    prob, expected, conf = in_process(params, "2", "round")
    assert_same_mask(mask, prob, expected)
    assert body["confidence"] == pytest.approx(conf, abs=1e-4)
    assert body["lesion_fraction"] == pytest.approx(mask.mean())

    # JSON with base64, answered as COCO RLE; the other lesion type goes to the other model
    as_json = requests.post(f"{url}/predict", json={"image": base64.b64encode(png(IMAGE)).decode(),
                                                    "lesion_type": "elongated", "mask_format": "rle"},
                            timeout=30).json()
    rle_mask = served_mask(as_json)
    prob_e, expected_e, _ = in_process(params, "2", "elongated")
    assert_same_mask(rle_mask, prob_e, expected_e)
    assert not np.array_equal(rle_mask, mask)


def _sized_png(width: int, height: int) -> bytes:
    return png(np.full((height, width), 128, np.uint8))


NOISE = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)


@pytest.mark.parametrize(("content_type", "body", "query", "status", "message"), [
    ("text/plain", b"hello", {}, 415, "unsupported Content-Type 'text/plain'"),
    (None, None, {}, 415, "unsupported Content-Type '(none)'"),
    ("image/png", b"GIF89a but not really", {"lesion_type": "round"}, 400, "not a readable image"),
    ("image/png", png(NOISE), {"lesion_type": "round"}, 413, f"the limit is {MAX_BYTES} bytes"),
    ("image/png", _sized_png(600, 20), {"lesion_type": "round"}, 422,
     f"600x20 px; sides must be between 8 and {MAX_SIDE} px"),
    ("image/png", _sized_png(4, 4), {"lesion_type": "round"}, 422, "4x4 px"),
    ("image/png", png(IMAGE), {"lesion_type": "polyp"}, 422,
     "no model for lesion type 'polyp'; this model knows ['elongated', 'round']"),
    ("image/png", png(IMAGE), {}, 422, "send lesion_type, one of ['elongated', 'round']"),
    ("image/png", png(IMAGE), {"lesion_type": "round", "mask_format": "jpeg"}, 400,
     "mask_format 'jpeg' is not one of png, rle"),
    ("application/json", b"{", {}, 400, "not valid JSON"),
    ("application/json", b'{"img": "x"}', {}, 400, '"image": <base64-encoded image>'),
    ("application/json", b'{"image": "%%%"}', {}, 400, "not valid base64"),
])
def test_bad_requests_get_4xx_with_a_clear_message(server, content_type, body, query, status, message):
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(f"{server[0]}/predict", params=query, data=body, headers=headers, timeout=30)
    assert answer.status_code == status and message in answer.json()["detail"], answer.text


def test_saved_answers_export_to_coco_that_pycocotools_reads(server, tmp_path):
    """What a client keeps (images + answers in predictions.jsonl) exports with the served masks
    as annotations and the served confidence as their score."""
    folder = tmp_path / "predictions"
    folder.mkdir()
    answers = {}
    for i, (lesion_type, mask_format) in enumerate([("round", "png"), ("elongated", "rle")]):
        data = png(np.ascontiguousarray(IMAGE[:, ::-1]) if i else IMAGE)
        (folder / f"img{i}.png").write_bytes(data)
        answers[f"img{i}"] = requests.post(f"{server[0]}/predict", data=data, timeout=30,
                                           params={"lesion_type": lesion_type, "mask_format": mask_format},
                                           headers={"Content-Type": "image/png"}).json()
    (folder / "predictions.jsonl").write_text("\n".join(
        json.dumps({**a, "id": k, "image": f"{k}.png"}) for k, a in answers.items()))
    assert main(["export", "--predictions", str(folder), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0

    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for img in coco.loadImgs(coco.getImgIds()):
        answer = answers[img["lesionflow_id"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert anns and {names[a["category_id"]] for a in anns} == {answer["lesion_type"]}
        assert {a["score"] for a in anns} == {answer["confidence"]}
        assert np.array_equal(np.logical_or.reduce([coco.annToMask(a) > 0 for a in anns]), served_mask(answer))


def test_reload_after_rollback_answers_with_the_restored_champion(server):
    url, cli_args, params = server
    done = subprocess.run([*LESIONFLOW, "rollback", "--why", "test", *cli_args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "v2 → v1" in done.stdout, done.stderr
    assert requests.get(f"{url}/health", timeout=10).json()["version"] == "2"  # until reloaded

    reloaded = requests.post(f"{url}/reload", timeout=60).json()
    assert (reloaded["version"], reloaded["previous_version"], reloaded["lesion_types"]) == ("1", "2", None)
    answer = requests.post(f"{url}/predict", data=png(IMAGE), headers={"Content-Type": "image/png"},
                           timeout=30).json()
    assert answer["version"] == "1"
    prob, expected, _ = in_process(params, "1", None)
    assert_same_mask(served_mask(answer), prob, expected)
