"""The reviewers' loop: the prediction log a real `lesionflow serve` process writes, and the review
queue that ranks images for reviewers and writes them with the champion's masks.

One registered model for the module (an untrained U-Net whose logits are rescaled so its masks on
noise images are neither empty nor full) and one real server that keeps images and rotates its
log every few records. The uncertainty cases use a hand-built model whose behaviour is known
(intensity term plus a horizontal-gradient term: equivariant to nothing but the identity), so a
strategy that ranks the wrong way fails.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, PngImagePlugin

from lesionflow import config, lineage, registry, tracking
from lesionflow.cli import main
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import Record, write_png
from lesionflow.errors import ReviewError
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from lesionflow.review import log as plog
from lesionflow.review.queue import BATCH, PANEL, RANKED_ARTIFACT, STRIP_ARTIFACT
from lesionflow.review.strategies import (
    STRATEGIES,
    Candidate,
    DiversityWeightedStrategy,
    difference_hash,
    make,
)
from lesionflow.serving import RELOAD_TOKEN_ENV
from lesionflow.uncertainty import Uncertainty, measure
from tests.conftest import REPO, free_port, wait_http

LESIONFLOW = [str(Path(sys.executable).parent / "lesionflow")]
SIDE = 48
MAX_BYTES = 1024  # the smallest segment serve.log_max_bytes allows: a few records each


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE + 16, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def segmenter(seed: int) -> Segmenter:
    """Untrained, with logits on a noise image rescaled to median 0 and spread 4."""
    torch.manual_seed(seed)
    model = Segmenter(UNet(3, 4, 1), 16, mean=[120.0] * 3, std=[60.0] * 3).eval()
    with torch.no_grad():
        logits = model(torch.tensor(model.prepare(noise(0))[None], dtype=torch.float32))
        scale = 4 / logits.std()
        model.net.head.weight *= scale
        model.net.head.bias.copy_((model.net.head.bias - logits.median()) * scale)
    return model


@pytest.fixture(scope="module")
def review_store() -> list[str]:
    """Where MLflow and DVC live, as overrides: none, the SQLite store and DVC remote under the
    workdir. A module that needs a tracking server and an S3 remote overrides this fixture."""
    return []


@pytest.fixture(scope="module")
def registered(tmp_path_factory, review_store):
    """(root, CLI overrides, params): model "reviewed" v1 is champion in ``review_store``."""
    root = tmp_path_factory.mktemp("review")
    overrides = [f"runtime.workdir={root}", *review_store, "runtime.model_name=reviewed",
                 "serve.follow_seconds=null", "serve.keep_images=true", f"serve.log_max_bytes={MAX_BYTES}"]
    params = config.load(REPO / "params.yaml", overrides)
    old_uri = mlflow.get_tracking_uri()
    tracking.connect(params)
    with mlflow.start_run():
        version = registry.register_model(segmenter(1), name="reviewed", metrics={}, lineage={
            lineage.TAG_DATASET_MD5: "d.dir", lineage.TAG_PARAMS_HASH: "p", lineage.TAG_PIPELINE_RUN_ID: "r"})
    registry.move_alias("reviewed", "champion", version, why="test", action="promote")
    yield root, [a for o in overrides for a in ("--set", o)], params
    mlflow.set_tracking_uri(old_uri)


@pytest.fixture(scope="module")
def server(registered):
    """The real `lesionflow serve` process; yields its URL."""
    root, cli_args, _ = registered
    port = free_port()
    with open(root / "serve.log", "w") as out:
        proc = subprocess.Popen([*LESIONFLOW, "serve", "--port", str(port), *cli_args], cwd=REPO,
                                env={**os.environ, RELOAD_TOKEN_ENV: "t"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ping", timeout=90, proc=proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def logged(params, n: int) -> list[plog.LogRecord]:
    """The log's records once it holds ``n`` (the server appends from a writer thread)."""
    deadline = time.monotonic() + 30
    while len(records := list(plog.read_log(plog.log_dir(params)))) < n:
        assert time.monotonic() < deadline, f"the log holds {len(records)} records, expected {n}"
        time.sleep(0.05)
    return records


def post(url: str, image: np.ndarray, **headers) -> requests.Response:
    return requests.post(f"{url}/predict", data=png(image), timeout=30,
                         headers={"Content-Type": "image/png", **headers})


# --- the prediction log -------------------------------------------------------------------------


def test_the_server_logs_every_answer_keeps_its_image_and_rotates_without_losing_a_line(server, registered):
    _, _, params = registered
    before = len(list(plog.read_log(plog.log_dir(params)))) if plog.log_dir(params).exists() else 0
    sent, answers = [], []
    for i in range(9):
        image = noise(100 + i)
        data = png(image)
        if i % 3 == 2:  # JSON body with a client request id
            answer = requests.post(f"{server}/predict", timeout=30, headers={"X-Request-ID": f"client-{i}"},
                                   json={"image": base64.b64encode(data).decode(), "mask_format": "rle"})
        else:
            answer = post(server, image)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-ID"] == answer.json()["request_id"]
        sent.append((image, data))
        answers.append(answer.json())
    # refused requests are not answers: nothing is logged for them
    assert post(server, noise(1), **{"X-Request-ID": "bad id/with spaces"}).status_code == 400
    assert requests.post(f"{server}/predict", data=b"not an image", timeout=30,
                         headers={"Content-Type": "image/png"}).status_code == 400

    records = logged(params, before + 9)[before:]
    assert len(records) == 9  # exactly the answers, in the order answered (one client)
    for (image, data), answer, record in zip(sent, answers, records, strict=True):
        assert record.request_id == answer["request_id"]
        assert (record.model, record.model_version, record.lesion_type) == ("reviewed", "1", None)
        assert record.confidence == answer["confidence"] and record.lesion_fraction == answer["lesion_fraction"]
        assert (record.height, record.width) == image.shape[:2]
        assert 0 < record.entropy < 1 and 0 <= record.ambiguous_area <= 1
        assert datetime.fromisoformat(record.time).tzinfo is not None
        assert record.image_sha256 == hashlib.sha256(data).hexdigest()
        assert record.image == f"images/{record.image_sha256}.png"
        kept = np.asarray(Image.open(plog.log_dir(params) / record.image))
        assert np.array_equal(kept, image)
    assert [r.request_id for r in records][2::3] == ["client-2", "client-5", "client-8"]

    segments = sorted(plog.log_dir(params).glob("predictions-*.jsonl"))
    assert len(segments) >= 3  # ~400-byte records, 1024-byte segments
    text = [s.read_bytes() for s in segments]
    assert all(len(t) <= MAX_BYTES and t.endswith(b"\n") for t in text)
    assert b"127.0.0.1" not in b"".join(text)  # nothing about the client beyond its request
    health = requests.get(f"{server}/health", timeout=10).json()["prediction_log"]
    assert (health["keep_images"], health["failed"]) == (True, 0)


def with_metadata(image: np.ndarray, fmt: str) -> bytes:
    """``image`` as PNG / JPEG / TIFF whose metadata names a patient (text chunk, EXIF and comment,
    TIFF tag)."""
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("PatientName", "Jane Doe")
        info.add_itxt("Comment", "Jane Doe, born 1970", zip=True)
        pil.save(buf, format="PNG", pnginfo=info)
    elif fmt == "JPEG":
        exif = Image.Exif()
        exif[0x010E] = "Jane Doe"  # ImageDescription
        pil.save(buf, format="JPEG", exif=exif, comment="Jane Doe", quality=90)
    else:
        pil.save(buf, format="TIFF", tiffinfo={270: "Jane Doe"})
    data = buf.getvalue()
    assert b"Jane Doe" in data
    return data


def test_kept_images_keep_the_pixels_and_none_of_the_files_metadata(server, registered):
    """A PNG with text chunks, a JPEG with EXIF and a comment, a TIFF with a description tag, each
    naming a patient: the kept files decode to the pixels the model saw and name no one; PNG and
    JPEG are kept as sent otherwise (no re-encoding), the TIFF becomes a PNG."""
    _, _, params = registered
    before = len(list(plog.read_log(plog.log_dir(params))))
    sent = {fmt: with_metadata(noise(300 + i), fmt) for i, fmt in enumerate(("PNG", "JPEG", "TIFF"))}
    for fmt, data in sent.items():
        content_type = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff"}[fmt]
        answer = requests.post(f"{server}/predict", data=data, headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == 200, answer.text
    records = logged(params, before + 3)[before:]
    for (fmt, data), record, ext in zip(sent.items(), records, ("png", "jpg", "png"), strict=True):
        assert record.image == f"images/{hashlib.sha256(data).hexdigest()}.{ext}"
        kept = (plog.log_dir(params) / record.image).read_bytes()
        assert b"Jane Doe" not in kept and b"Jane Doe" not in record.model_dump_json().encode()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(kept))), np.asarray(Image.open(io.BytesIO(data))))
        if fmt == "JPEG":  # the compressed scan itself is kept, byte for byte
            assert data[data.index(b"\xff\xda"):] == kept[kept.index(b"\xff\xda"):]


def test_an_unwritable_log_dir_stops_serve_with_a_named_error(registered, tmp_path, capsys):
    _, cli_args, _ = registered
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["serve", "--port", "0", *cli_args, "--set", f"serve.log_dir={blocker}"]) == 2
    assert "PredictionLogError: cannot write the prediction log at" in capsys.readouterr().err


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lesionflow.review.log import LogRecord, SegmentWriter
    folder, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    writer = SegmentWriter(folder, 4096)
    (folder / f"ready-{name}").touch()
    while not (folder / "go").exists():
        pass
    for i in range(n):
        record = LogRecord(request_id=f"{name}-{i}", time="2026-01-01T00:00:00+00:00", model="m",
                           model_version="1", lesion_type="x" * (i * 37 % 900), confidence=0.5,
                           lesion_fraction=0.1, entropy=0.2, ambiguous_area=0.3, height=8, width=8,
                           image_sha256="0" * 64)
        writer.append(record.model_dump_json().encode() + b"\\n")
""")


def test_writer_processes_append_whole_lines_and_rotate_at_the_limit(tmp_path):
    """Four real processes (server workers or replicas sharing a volume) append records of 0.3-1.2 KB
    to one log with 4 KB segments, released together: every record reads back once, every
    line parses (an interleaved write would not), and no segment is past the limit — without the
    lock, two writers check the size and both append, overfilling a segment in every try of this
    test by hand (7-25 segments of ~225)."""
    n, names = 300, "abcd"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(n)]) for name in names]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{name}").exists() for name in names):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * len(names)
    ids = [r.request_id for r in plog.read_log(tmp_path)]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in names for i in range(n))
    for w in names:  # each writer's own records stay in its order
        assert [i for i in ids if i.startswith(w)] == [f"{w}-{i}" for i in range(n)]
    segments = list(tmp_path.glob("predictions-*.jsonl"))
    assert len(segments) > 100 and all(s.stat().st_size <= 4096 for s in segments)


def test_kept_images_go_to_s3_and_read_back(tmp_path, s3_server, s3_bucket):
    params = config.load(None, [f"runtime.workdir={tmp_path}", "serve.keep_images=true",
                                f"serve.image_store=s3://{s3_bucket}/kept", f"runtime.s3_endpoint_url={s3_server}"])
    log = plog.PredictionLog.for_params(params)
    image = noise(7)
    log.record({"request_id": "r1", "time": "2026-01-01T00:00:00+00:00", "model": "m", "model_version": "1",
                "lesion_type": None, "confidence": 0.9, "lesion_fraction": 0.2, "entropy": 0.1,
                "ambiguous_area": 0.0, "height": SIDE, "width": SIDE + 16}, png(image), image)
    log.close()
    (record,) = plog.read_log(tmp_path / "predictions")
    assert record.image == f"s3://{s3_bucket}/kept/{hashlib.sha256(png(image)).hexdigest()}.png"
    store = plog.ImageStore.for_config(params.serve, tmp_path / "predictions", s3_server)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(store.get(record.image)))), image)


# --- uncertainty and strategies -----------------------------------------------------------------


class GradientModel:
    """p = sigmoid((grey - 128) / 16 + d/dx grey / 8): the intensity term is the same in every TTA
    view, the gradient term only where the structure runs across x — so vertical stripes near
    grey 128 get coin-toss probabilities that change with the view, a bright disc on black does
    not."""

    def predict_proba(self, images, lesion_types=None):
        out = []
        for image in images:
            grey = image.astype(float).mean(axis=2)
            dx = np.diff(grey, axis=1, append=grey[:, -1:])
            out.append(1 / (1 + np.exp(-((grey - 128) / 16 + dx / 8))))
        return out


def confident_image() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    return np.repeat((((yy - 32) ** 2 + (xx - 30) ** 2 < 15**2) * 255).astype(np.uint8)[..., None], 3, axis=2)


def ambiguous_image() -> np.ndarray:
    stripes = np.where(np.arange(64) // 2 % 2, 132, 124).astype(np.uint8)
    return np.repeat(np.tile(stripes, (64, 1))[..., None], 3, axis=2)


def candidate(i: int, u: Uncertainty, group: str | None = None, dhash: int | None = None) -> Candidate:
    random_bits = int(np.random.default_rng(i).integers(0, 2**63))  # ~32 bits from any other
    return Candidate(f"c{i}", f"test:{i}", "lesion", group, f"{i:064x}", random_bits if dhash is None else dhash,
                     u, lambda: np.zeros((8, 8), np.uint8))


def test_entropy_and_tta_rank_an_ambiguous_image_above_a_confident_one():
    model, params = GradientModel(), config.Params()
    sure, unsure = (measure(model, image, 0.5) for image in (confident_image(), ambiguous_image()))
    assert sure.entropy < 0.05 and sure.tta_agreement > 0.95 and sure.ambiguous_area < 0.1
    assert unsure.entropy > 0.5 and unsure.tta_agreement < 0.8 and unsure.ambiguous_area > 0.5
    pool = [candidate(0, sure), candidate(1, unsure)]
    for name in ("entropy", "tta", "diversity-weighted"):
        strategy = make(name, params)
        scores = strategy.rank(pool)
        assert scores[1] > scores[0], name
        assert strategy.select(pool, scores, 1) == [1], name
    with pytest.raises(ReviewError, match="no review strategy named 'margin'; registered: diversity-weighted"):
        make("margin", params)
    assert set(STRATEGIES) >= {"random", "entropy", "tta", "diversity-weighted"}


def test_diversity_keeps_one_video_from_filling_the_batch():
    """Video v0's six frames are the most uncertain: entropy takes four of them; diversity-weighted
    takes one and spreads the rest over v1 and the stills, and of two near-identical stills
    (different patients, same picture) only one."""
    pool = [candidate(i, Uncertainty(0.5 - i * 0.01, 0.9 - i * 0.01, 0.8), "v0") for i in range(6)]
    pool += [candidate(6 + i, Uncertainty(0.7 - i * 0.01, 0.6 - i * 0.01, 0.5), "v1") for i in range(3)]
    pool += [candidate(9 + i, Uncertainty(0.6, 0.5 - i * 0.01, 0.4), f"p{i}") for i in range(4)]
    twin = difference_hash(noise(3))
    pool[9].dhash, pool[10].dhash = twin, difference_hash(np.clip(noise(3).astype(int) + 4, 0, 255).astype(np.uint8))
    assert bin(pool[9].dhash ^ pool[10].dhash).count("1") <= 6 < bin(twin ^ difference_hash(noise(4))).count("1")

    entropy = make("entropy", config.Params())
    assert {pool[i].group for i in entropy.select(pool, entropy.rank(pool), 4)} == {"v0"}
    diverse = DiversityWeightedStrategy(0.8)
    picked = [pool[i] for i in diverse.select(pool, diverse.rank(pool), 5)]
    groups = [c.group for c in picked]
    assert groups.count("v0") == 1 and groups.count("v1") == 1 and len(set(groups)) == 5
    assert not {"c9", "c10"} <= {c.id for c in picked}
    # weight 0: no diversity, the same picks as ranking alone
    plain = DiversityWeightedStrategy(0.0)
    scores = plain.rank(pool)
    assert plain.select(pool, scores, 4) == [int(i) for i in np.argsort(-scores, kind="stable")[:4]]


# --- review next ---------------------------------------------------------------------------------


def dataset(folder: Path) -> Path:
    """Two videos of four unmasked frames, four unlabelled stills, one labelled still and one weak
    record (the last two are not candidates)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    records = []

    def add(record_id: str, kind: str, group: str, seed: int, **extra) -> None:
        image = noise(seed)
        rel = f"images/{record_id}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        records.append(Record(id=record_id, kind=kind, image=rel, image_sha256=write_png(image, folder / rel),
                              height=SIDE, width=SIDE + 16, channels=3, lesion_type="round", group=group,
                              split="train", source=rel, **extra))

    for v in range(2):
        for t in range(4):
            add(f"video_{v}/f{t}", "video_frame", f"video_{v}", 10 * v + t + 20, frame_index=t)
    for i in range(4):
        add(f"still_{i}", "unlabelled", f"patient_{i}", 40 + i)
    add("weak_0", "weak", "patient_w", 50, area_ratio=0.1)
    add("labelled_0", "still", "patient_l", 51)
    mask_sha256 = write_png(np.zeros((SIDE, SIDE + 16), np.uint8), folder / "masks" / "labelled_0.png")
    records[-1] = records[-1].model_copy(update={"mask": "masks/labelled_0.png", "mask_sha256": mask_sha256})
    write_index(folder, records)
    return folder


def test_review_next_writes_the_batch_with_the_champions_masks_and_logs_it(registered, tmp_path):
    root, cli_args, params = registered
    data = dataset(tmp_path / "dataset")
    out = tmp_path / "batch"
    assert main(["review", "next", "--n", "4", "--strategy", "diversity-weighted", "--dataset", str(data),
                 "--out", str(out), *cli_args]) == 0

    batch = json.loads((out / BATCH).read_text())
    assert set(batch) == {"strategy", "model_version", "created", "items"}
    assert (batch["strategy"], batch["model_version"]) == ("diversity-weighted", "1")
    assert datetime.fromisoformat(batch["created"]).tzinfo is not None
    assert len(batch["items"]) == 4
    tracking.connect(params)
    model = registry.load_pyfunc("reviewed", "1")
    for item in batch["items"]:
        assert set(item) == {"id", "image", "prediction", "lesion_type", "score", "source"}
        assert item["image"] == f"images/{item['id']}.png" and item["prediction"] == f"predictions/{item['id']}.png"
        assert item["source"] == f"dataset:{item['id']}" and item["lesion_type"] == "round"
        assert isinstance(item["score"], float)
        image = np.asarray(Image.open(out / item["image"]))
        assert np.array_equal(image, np.asarray(Image.open(data / item["image"])))
        prediction = np.asarray(Image.open(out / item["prediction"]))
        assert set(np.unique(prediction)) <= {0, 255}
        expected = model.segment(image, "round").mask
        assert np.array_equal(prediction == 255, expected) and 0 < expected.mean() < 1
    assert not {"weak_0", "labelled_0"} & {item["id"] for item in batch["items"]}

    run = MlflowClient().get_run(mlflow.search_runs(filter_string=f"tags.`{lineage.TAG_STEP}` = 'review'",
                                                    output_format="list")[0].info.run_id)
    assert run.data.params["strategy"] == "diversity-weighted" and run.data.params["diversity_weight"] == "0.7"
    ranked = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path=RANKED_ARTIFACT,
                                                                 dst_path=str(tmp_path))).read_text())
    assert len(ranked) == 12 and [r["rank"] for r in ranked] == list(range(1, 13))
    assert [r["id"] for r in ranked[:4]] == [item["id"] for item in batch["items"]]
    assert [r["picked"] for r in ranked] == [True] * 4 + [False] * 8
    strip = Image.open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=STRIP_ARTIFACT,
                                                           dst_path=str(tmp_path)))
    assert strip.width == 4 * PANEL and strip.height > 2 * PANEL
    pixels = np.asarray(strip.convert("RGB")).astype(int)
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 60)).any()  # mask outlines

    again = main(["review", "next", "--dataset", str(data), "--out", str(out), *cli_args])
    assert again == 2  # the batch folder is not overwritten


def test_review_next_from_the_prediction_log_ranks_the_kept_images(server, registered, tmp_path, capsys):
    """Three images answered (one of them twice): three candidates, each traced to its request."""
    _, cli_args, params = registered
    before = len(list(plog.read_log(plog.log_dir(params))))
    ids = [post(server, noise(seed)).json()["request_id"] for seed in (200, 201, 202, 200)]
    logged(params, before + 4)
    out = tmp_path / "from-log"
    assert main(["review", "next", "--from", "predictions", "--strategy", "tta", "--n", "50", "--out", str(out),
                 *cli_args]) == 0
    items = json.loads((out / BATCH).read_text())["items"]
    sources = {item["source"] for item in items}
    assert {f"prediction:{i}" for i in ids[1:]} <= sources and f"prediction:{ids[0]}" not in sources
    assert len(items) == len({item["id"] for item in items})  # an image sent twice is one candidate
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)  # tta: best first
    by_source = {item["source"]: item for item in items}
    image = np.asarray(Image.open(out / by_source[f"prediction:{ids[1]}"]["image"]))
    assert np.array_equal(image, noise(201))
    assert "candidates for review (tta, model v1" in capsys.readouterr().out
