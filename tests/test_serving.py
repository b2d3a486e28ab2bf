"""Serving: the real `lesionflow serve` process against a real MLflow store, over real HTTP.

One server for the module (start-up costs seconds): v1 is a single model, v2 one model per lesion
type; v2 is champion until the last test rolls back to v1 with the real `lesionflow rollback`.
Masks are compared with the same version loaded in-process; pixels whose probability lies within
1e-4 of the threshold may flip between processes (thread counts change float sums) and are skipped.

Admission, reload atomicity and the reload token are tested on the same app run by uvicorn in a
thread, over real HTTP, with an in-memory registry whose models can hold a request inside
``segment`` until the test opens a gate: "in flight" and "queue full" are states the test
creates, not timings it hopes for.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
import uvicorn
from PIL import Image
from pycocotools.coco import COCO

from lesionflow import config, lineage, registry, tracking
from lesionflow.cli import main
from lesionflow.errors import RegistryError
from lesionflow.models.pyfunc import SegmentationModel, decode_rle
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.serving import RELOAD_TOKEN_ENV, create_app
from tests.conftest import REPO, free_port, wait_http

MAX_BYTES, MAX_SIDE = 64 * 1024, 512
TOKEN = "test-reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
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
                                env={**os.environ, RELOAD_TOKEN_ENV: TOKEN},
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
    assert (health["version"], health["lesion_types"], health["runtime"]) == (
        "2", ["elongated", "round"], "onnxruntime")

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


def test_reload_after_rollback_under_load_fails_no_request(server):
    """After `lesionflow rollback`, four clients keep sending while POST /reload swaps v2 for v1:
    every answer is a 200, and each client sees v2 until it sees v1, never v2 again after."""
    url, cli_args, params = server
    done = subprocess.run([*LESIONFLOW, "rollback", "--why", "test", *cli_args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "v2 → v1" in done.stdout, done.stderr
    assert requests.get(f"{url}/health", timeout=10).json()["version"] == "2"  # until reloaded

    answering, reloaded_at = threading.Semaphore(0), threading.Event()

    def client() -> list[tuple[int, str | None]]:
        seen, deadline = [], time.monotonic() + 120  # bounded even if the reload fails
        with requests.Session() as session:
            while (not reloaded_at.is_set() or seen[-1][1] != "1") and time.monotonic() < deadline:
                answer = session.post(f"{url}/predict", params={"lesion_type": "round"}, data=png(IMAGE),
                                      headers={"Content-Type": "image/png"}, timeout=30)
                seen.append((answer.status_code, answer.json().get("version")))
                if len(seen) == 1:
                    answering.release()
        return seen

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        try:
            for _ in clients:
                assert answering.acquire(timeout=60), "a client got no answer"
            reloaded = requests.post(f"{url}/reload", headers=AUTH, timeout=60)
        finally:
            reloaded_at.set()
        seen = [c.result(timeout=120) for c in clients]
    assert reloaded.status_code == 200, reloaded.text
    body = reloaded.json()
    assert (body["version"], body["previous_version"], body["lesion_types"]) == ("1", "2", None)
    for answers in seen:
        assert {status for status, _ in answers} == {200}
        versions = [v for _, v in answers]
        assert versions == sorted(versions, reverse=True) and (versions[0], versions[-1]) == ("2", "1"), versions

    answer = requests.post(f"{url}/predict", data=png(IMAGE), headers={"Content-Type": "image/png"},
                           timeout=30).json()
    assert answer["version"] == "1"
    prob, expected, _ = in_process(params, "1", None)
    assert_same_mask(served_mask(answer), prob, expected)


# --- admission, reload and token: the app in a thread, models held at will ---------------------


class Held:
    """A served model whose ``segment`` reports each call on ``entered`` and then waits for
    ``gate``: a request stays inside the model until the test lets it go."""

    def __init__(self, seed: int):
        self.inner = SegmentationModel.wrap(segmenter(seed))
        self.lesion_types, self.threshold, self.runtime_name = None, self.inner.threshold, "torch"
        self.gate = threading.Event()
        self.gate.set()
        self.entered: queue.Queue = queue.Queue()

    def hold(self) -> None:
        self.entered = queue.Queue()  # forget the warm-up call
        self.gate.clear()

    def segment(self, image, lesion_type=None):
        self.entered.put(threading.current_thread().name)
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        return self.inner.segment(image, lesion_type)


class Failing(Held):
    """Loads, then fails its warm-up: a version that must never be swapped in."""

    def segment(self, image, lesion_type=None):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


class Versions:
    """An in-memory registry: ``alias`` is the version ``champion`` names (None: no alias);
    loading a version returns its entry in ``models``, or raises it when it is an exception."""

    def __init__(self, models: dict):
        self.models, self.alias = models, "1"

    def resolve(self, name: str, ref: str) -> str:
        if self.alias is None:
            raise RegistryError(f"model {name!r} has no alias {ref!r}; existing aliases: none")
        return self.alias

    def load_pyfunc(self, name: str, version: str):
        loaded = self.models[version]
        if isinstance(loaded, Exception):
            raise loaded
        return loaded


@contextmanager
def app_server(monkeypatch, versions: Versions, token: str | None = TOKEN, **serve) -> Iterator[str]:
    """The real app on a real uvicorn in a thread; ``serve`` overrides ServeConfig fields."""
    monkeypatch.setattr(registry, "resolve", versions.resolve)
    monkeypatch.setattr(registry, "load_pyfunc", versions.load_pyfunc)
    cfg = config.ServeConfig(follow_seconds=None, **serve)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app("served", "champion", cfg, reload_token=token),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        for model in versions.models.values():
            if isinstance(model, Held):
                model.gate.set()
        server.should_exit = True
        thread.join(timeout=30)


def send(url: str, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(f"{url}/predict", data=png(IMAGE),
                                      headers={"Content-Type": "image/png"}, timeout=60)


def wait_in_flight(url: str, n: int) -> None:
    """Until the server has admitted ``n`` requests (its own count, read from /health)."""
    deadline = time.monotonic() + 30
    while requests.get(f"{url}/health", timeout=10).json()["in_flight"] != n:
        assert time.monotonic() < deadline, f"the server never had {n} requests in flight"
        time.sleep(0.01)


def test_past_workers_plus_queue_a_request_gets_503_with_retry_after_at_once(monkeypatch):
    v1 = Held(1)
    with app_server(monkeypatch, Versions({"1": v1}), inference_workers=1, max_queue=2,
                    retry_after_seconds=7) as url, ThreadPoolExecutor(3) as pool:
        v1.hold()
        running = pool.submit(send, url)
        v1.entered.get(timeout=30)  # one request inside the model ...
        queued = [pool.submit(send, url) for _ in range(2)]
        wait_in_flight(url, 3)  # ... and two waiting for the only worker: the bound is reached

        refused = send(url)  # answered while the gate is still closed: it was never queued
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"
        assert "serve.inference_workers 1 + serve.max_queue 2" in refused.json()["detail"]
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"  # probes still answer

        v1.gate.set()
        assert [f.result(timeout=60).status_code for f in [running, *queued]] == [200, 200, 200]
        assert send(url).status_code == 200
        assert requests.get(f"{url}/health", timeout=10).json()["in_flight"] == 0


def test_a_reload_while_requests_are_in_flight_fails_none_of_them(monkeypatch):
    """A request inside v1 and one waiting for a worker when /reload swaps in v2: both finish on
    v1, the one that arrives after the swap gets v2, and the reload waits for none of them."""
    v1, v2 = Held(1), Held(2)
    versions = Versions({"1": v1, "2": v2})
    with app_server(monkeypatch, versions, inference_workers=1) as url, ThreadPoolExecutor(3) as pool:
        v1.hold()
        inside = pool.submit(send, url)
        v1.entered.get(timeout=30)
        waiting = pool.submit(send, url)
        wait_in_flight(url, 2)

        versions.alias = "2"
        reloaded = requests.post(f"{url}/reload", headers=AUTH, timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        assert (reloaded.json()["version"], reloaded.json()["previous_version"]) == ("2", "1")
        assert not inside.done() and not waiting.done()  # the swap did not wait for them
        after = pool.submit(send, url)
        wait_in_flight(url, 3)

        v1.gate.set()
        answers = [f.result(timeout=60) for f in (inside, waiting, after)]
        assert [(a.status_code, a.json()["version"]) for a in answers] == [(200, "1"), (200, "1"), (200, "2")]


def test_a_failed_reload_keeps_the_old_model_serving(monkeypatch):
    versions = Versions({"1": Held(1), "2": OSError("weights/model.pt: No such file or directory"),
                         "3": Failing(3)})
    with app_server(monkeypatch, versions) as url:
        for version, cause in (("2", "OSError: weights/model.pt"), ("3", "RuntimeError: mat1 and mat2")):
            versions.alias = version
            failed = requests.post(f"{url}/reload", headers=AUTH, timeout=60)
            assert failed.status_code == 503 and failed.headers["Retry-After"] == "1", failed.text
            assert cause in failed.json()["detail"] and "still serving v1" in failed.json()["detail"]
            assert requests.get(f"{url}/health", timeout=10).json()["version"] == "1"
            assert (send(url).status_code, send(url).json()["version"]) == (200, "1")

        versions.alias = None
        gone = requests.post(f"{url}/reload", headers=AUTH, timeout=60)
        assert gone.status_code == 409 and "has no alias 'champion'" in gone.json()["detail"]
        assert "still serving v1" in gone.json()["detail"]


def test_reload_needs_the_servers_token(monkeypatch):
    versions = Versions({"1": Held(1)})
    with app_server(monkeypatch, versions, token=None) as url:
        disabled = requests.post(f"{url}/reload", headers=AUTH, timeout=30)
        assert disabled.status_code == 403 and RELOAD_TOKEN_ENV in disabled.json()["detail"]

    with app_server(monkeypatch, versions) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": "Bearer t\xe4st"}, {"Authorization": TOKEN}):
            refused = requests.post(f"{url}/reload", headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", headers
            assert "Authorization: Bearer <token>" in refused.json()["detail"]
        accepted = requests.post(f"{url}/reload", headers=AUTH, timeout=30)
        assert accepted.status_code == 200 and accepted.json()["previous_version"] == "1"
