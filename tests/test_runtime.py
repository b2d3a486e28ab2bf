"""The ONNX Runtime path a registered version serves through, held to torch's answers.

Tolerance: probabilities within max |Δp| ≤ 1e-4 of torch's (float32 sums in another order, and
BatchNorm folded into the convolutions, move them by ~1e-7), and masks equal on ≥ 99.9 % of pixels
(only a pixel whose probability lies within that 1e-4 of the threshold may flip).
The fallback is real: onnxruntime is made unimportable, not replaced.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow import MlflowClient
from PIL import Image

from lesionflow.errors import ConfigError
from lesionflow.models import runtime
from lesionflow.models.pyfunc import SIGNATURE, decode_rle
from lesionflow.models.router import LesionTypeRouter, UnknownLesionTypeError
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet
from tests.conftest import free_port, stop_process_group, wait_http
from tests.test_registry import LINEAGE, tracking_uri

MAX_DP, MIN_AGREEMENT = 1e-4, 0.999
RNG = np.random.default_rng(0)
# odd sizes, gray and RGB: the resize to the model's side and back runs on every path
IMAGES = [RNG.integers(0, 256, shape, dtype=np.uint8)
          for shape in [(48, 64, 3), (37, 29, 3), (64, 64), (90, 51, 3), (32, 32, 3), (50, 70)]]


def segmenter(seed: int, in_channels: int = 3, upsample: str = "bilinear", tta: str = "none") -> Segmenter:
    """An untrained model with BatchNorm statistics that matter and logits spread around 0, so its
    masks are neither empty nor full and few pixels sit at the threshold."""
    torch.manual_seed(seed)
    model = Segmenter(UNet(in_channels, 8, 3, upsample=upsample), 32, [110.0] * 3, [55.0] * 3, tta)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.eval()
        logits = model(torch.tensor(np.stack([model.prepare(im) for im in IMAGES]), dtype=torch.float32))
        scale = 4 / logits.std()
        model.net.head.weight *= scale
        model.net.head.bias.copy_((model.net.head.bias - logits.median()) * scale)
    return model


def assert_same_answers(ours: list[np.ndarray], torch_: list[np.ndarray]) -> None:
    for p, q in zip(ours, torch_, strict=True):
        assert p.shape == q.shape and p.dtype == q.dtype == np.float32
        assert np.abs(p - q).max() <= MAX_DP
        assert ((p > 0.5) == (q > 0.5)).mean() >= MIN_AGREEMENT
        assert 0.05 < (q > 0.5).mean() < 0.95  # not vacuous


@pytest.mark.parametrize(("in_channels", "upsample", "tta"),
                         [(3, "bilinear", "none"), (1, "transpose", "none"), (3, "bilinear", "hv")])
def test_exported_segmenter_answers_as_torch(in_channels, upsample, tta):
    model = segmenter(1, in_channels, upsample, tta)
    fast = runtime.predictor(model, runtime="onnxruntime")
    assert isinstance(fast, runtime.OnnxSegmenter) and runtime.runtime_name(fast) == "onnxruntime"
    expected = model.predict_proba(IMAGES)
    assert_same_answers(fast.predict_proba(IMAGES), expected)
    # any batch size: the graph's batch axis is dynamic
    assert_same_answers(fast.predict_proba(IMAGES, batch_size=4), expected)
    assert_same_answers([fast.predict_proba([im])[0] for im in IMAGES], expected)


def test_exported_router_answers_as_torch_and_refuses_alike(tmp_path):
    router = LesionTypeRouter({"round": segmenter(2), "elongated": segmenter(3, in_channels=1)})
    runtime.save(router, tmp_path / runtime.ONNX)
    fast = runtime.load(tmp_path / runtime.ONNX, router)
    assert isinstance(fast, runtime.OnnxRouter) and fast.lesion_types == ["elongated", "round"]
    types = ["round", "elongated"] * 3
    assert_same_answers(fast.predict_proba(IMAGES, types), router.predict_proba(IMAGES, types))
    for model in (router, fast):
        with pytest.raises(UnknownLesionTypeError, match="no model for lesion type 'flat'"):
            model.predict_proba(IMAGES[:1], ["flat"])
        with pytest.raises(UnknownLesionTypeError, match="one lesion type per image"):
            model.predict_proba(IMAGES[:2])


@pytest.mark.parametrize("tta", ["none", "h"])
def test_the_int8_twin_is_int8_and_answers_near_the_float_graph(tta):
    """Static int8 keeps the graph's interface (any batch, same map sizes), stores int8 weights
    (the file shrinks ~3x), and answers near the float graph. This random model's logits are
    scaled to be touchy (std 4 around the threshold), so the bound is loose: the evaluate step's
    validation-Dice check, not this, is what decides whether int8 serves (test_gate)."""
    import onnx

    model = segmenter(7, tta=tta)
    float_graph = runtime.to_onnx(model)
    int8_graph = runtime.quantize_int8(float_graph, np.stack([model.prepare(im) for im in IMAGES]))
    weights = {t.data_type for t in onnx.load_from_string(int8_graph).graph.initializer if len(t.dims) == 4}
    assert weights == {onnx.TensorProto.INT8} and len(int8_graph) < len(float_graph) / 2
    exact, fast = runtime.OnnxSegmenter(float_graph, model), runtime.OnnxSegmenter(int8_graph, model)
    expected, answers = exact.predict_proba(IMAGES), fast.predict_proba(IMAGES, batch_size=4)
    for p, q in zip(answers, expected, strict=True):
        assert p.shape == q.shape and p.dtype == np.float32
        assert np.abs(p - q).mean() < 0.15 and ((p > 0.5) == (q > 0.5)).mean() > 0.75
    assert not all(np.array_equal(p, q) for p, q in zip(answers, expected, strict=True))  # really another graph


def test_export_leaves_the_models_mode_alone():
    model = segmenter(4).train()
    runtime.to_onnx(model)
    assert all(m.training for m in model.modules())


def test_without_onnxruntime_torch_answers(monkeypatch):
    model = segmenter(5)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.warns(UserWarning, match="onnxruntime is not installed"):
        assert runtime.predictor(model) is model


def test_the_runtime_is_chosen_by_argument_or_environment(monkeypatch):
    model = segmenter(6)
    assert runtime.predictor(model, runtime="torch") is model
    monkeypatch.setenv(runtime.RUNTIME_ENV, "torch")
    assert runtime.predictor(model) is model
    assert runtime.runtime_name(runtime.predictor(model, runtime="onnxruntime")) == "onnxruntime"
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ConfigError, match="'tensorrt' must be one of onnxruntime, torch"):
        runtime.predictor(model)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking URI, name): v1 a single model, v2 a per-type router, in a SQLite store."""
    from lesionflow import registry

    root = tmp_path_factory.mktemp("runtime-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_uri(uri):
        exp = MlflowClient().create_experiment("runtime", artifact_location=(root / "artifacts").as_uri())
        for model in (segmenter(7), LesionTypeRouter({"round": segmenter(8), "elongated": segmenter(9)})):
            with mlflow.start_run(experiment_id=exp):
                registry.register_model(model, name="fast", lineage=LINEAGE, metrics={})
        yield uri, "fast"


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_a_registered_version_carries_its_export_and_a_binary_image_signature(registered, monkeypatch):
    from lesionflow import registry

    uri, name = registered
    with tracking_uri(uri):
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        assert info.signature == SIGNATURE and info.signature.inputs.input_types()[0].name == "binary"
        files = {p.name for p in Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2")).rglob("*")}
        assert {"segmenter-0.onnx", "segmenter-1.onnx", "segmenter-0.pt"} <= files
        for version in ("1", "2"):
            fast = registry.load_pyfunc(name, version)
            assert fast.runtime_name == "onnxruntime"
            monkeypatch.setitem(sys.modules, "onnxruntime", None)
            with pytest.warns(UserWarning, match="onnxruntime is not installed"):
                slow = registry.load_pyfunc(name, version)
            monkeypatch.delitem(sys.modules, "onnxruntime")
            assert slow.runtime_name == "torch"
            lesion_type = None if version == "1" else "elongated"
            for image in IMAGES:
                a, b = fast.segment(image, lesion_type), slow.segment(image, lesion_type)
                assert (a.mask == b.mask).mean() >= MIN_AGREEMENT
                assert a.confidence == pytest.approx(b.confidence, abs=MAX_DP)
        frame = pd.DataFrame({"image": [png(IMAGES[0])], "lesion_type": ["round"]})
        out = mlflow.pyfunc.load_model(f"models:/{name}/2").predict(frame)
        assert decode_rle(out["mask"][0]).shape == IMAGES[0].shape[:2]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_posted_image(registered, tmp_path):
    """Standard MLflow serving, as a cluster's MLflow runtime would run it: the real
    ``mlflow models serve`` process on a registered version, base64 image bytes in its JSON."""
    from lesionflow import registry

    uri, name = registered
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{name}/2", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=90, proc=proc)
        images, types = IMAGES[:2], ["round", "elongated"]
        rows = [[base64.b64encode(png(im)).decode("ascii"), t] for im, t in zip(images, types, strict=True)]
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                               json={"dataframe_split": {"columns": ["image", "lesion_type"], "data": rows}})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
    finally:
        stop_process_group(proc)
    with tracking_uri(uri):
        model = registry.load_pyfunc(name, "2")
    for pred, image, lesion_type in zip(predictions, images, types, strict=True):
        expected = model.segment(image, lesion_type)
        assert (pred["height"], pred["width"]) == image.shape[:2]
        assert (decode_rle(pred["mask"]) == expected.mask).mean() >= MIN_AGREEMENT
        assert pred["confidence"] == pytest.approx(expected.confidence, abs=MAX_DP)
