"""ONNX Runtime: the fast path a registered model serves through, with torch as its fallback.

Why: on the 2-core CPUs it is served on, ONNX Runtime with every graph optimization (BatchNorm
folded into the convolutions, fused activations) segments a frame with the default U-Net in about
half torch's CPU time, and its thread pool does not collapse on the main thread when the cores are
oversubscribed as torch's OpenMP team does (``bench/runtime_bench.py`` measures both).

What is exported: the whole ``Segmenter`` (normalisation inside) plus the sigmoid, traced through
its ``forward`` only, so any network behind a ``Segmenter`` exports: float input (batch, C, S, S) on
the uint8 scale at the model's own size S, probabilities (batch, S, S) out. Pre-processing (resize
to S) and the resize back run the ``Segmenter``'s own code, so both runtimes answer alike
(``tests/test_runtime.py`` holds them to max |Δp| ≤ 1e-4).

The exporter is the TorchScript one (``dynamo=False``): about 2 s per model against 10–17 s for
torch.export's (which also needs onnxscript), paid at every registration. torch deprecates it, and
torch is pinned below 2.14; the tests compare the export with torch, so an upgrade that breaks it
fails there.

int8 (``quantize_int8``): the evaluate step, which has the data, calibrates a static int8 twin of
the graph on train images and keeps it only where validation Dice says it costs at most
``evaluate.int8_max_dice_drop``; registration then stores whichever graph was evaluated. On CPUs
with VNNI (AVX-512 VNNI, AVX-VNNI) its convolutions run on int8 dot-product units: 2.1× the
network's frames/s at 256² on a Kvasir-SEG model, validation Dice unchanged (README, "Serving and export").
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionflow.data.transforms import resize_prob
from lesionflow.errors import ConfigError
from lesionflow.models.router import LesionTypeRouter, Routing
from lesionflow.models.segmenter import Segmenter

ONNX = "onnx"  # the artifact key of the export folder, next to the weights
SINGLE = "segmenter.onnx"
ROUTER = "lesion_types.json"
OPSET = 18
RUNTIMES = ("onnxruntime", "torch")
RUNTIME_ENV = "LESIONFLOW_RUNTIME"


class _Probabilities(nn.Module):
    """What is exported: a ``Segmenter``'s ``probabilities`` (its test-time flips included), channel
    dropped."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(x)[:, 0]


def to_onnx(model: Segmenter) -> bytes:
    """The ONNX graph of ``model`` in eval mode (the exporter puts back the mode it had), at its
    own input size, any batch size."""
    side = model.image_size
    x = torch.zeros(1, model.in_channels, side, side, device=model.mean.device)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter's own deprecation notice, and the tracer's about the network's size checks
        # (constant here: the input size is fixed).
        warnings.simplefilter("ignore")
        torch.onnx.export(_Probabilities(model).train(model.training), (x,), buf, input_names=["x"],
                          output_names=["prob"], dynamic_axes={"x": {0: "batch"}, "prob": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def quantize_int8(onnx: bytes, calibration: np.ndarray) -> bytes:
    """``onnx`` quantized to int8 (QDQ): weights per output channel, activations uint8 with ranges
    taken (min/max) from running ``calibration`` — float (N, C, S, S) inputs on the uint8 scale at
    the model's side, from the train split, never the test one — through the float graph."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.inputs = iter([{"x": x[None].astype(np.float32)} for x in calibration])

        def get_next(self) -> dict | None:
            return next(self.inputs, None)

    with tempfile.TemporaryDirectory(prefix="lesionflow-int8-") as tmp:
        source, prepared, quantized = (Path(tmp) / name for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(onnx)
        # shapes inferred, graph folded first (the symbolic pass, for dynamic-shape transformers,
        # fails on the U-Net's size-dependent upsampling)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return quantized.read_bytes()


def graph_files(onnx_dir: Path) -> dict[str | None, Path]:
    """The graphs of an export (``save``): ``{None: path}`` for one model, else lesion type → path."""
    onnx_dir = Path(onnx_dir)
    if (onnx_dir / ROUTER).is_file():
        return {t: onnx_dir / name for t, name in json.loads((onnx_dir / ROUTER).read_text()).items()}
    return {None: onnx_dir / SINGLE}


def available() -> bool:
    """Whether onnxruntime can be imported here (else everything runs on torch)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def save(model: Segmenter | LesionTypeRouter, out_dir: Path) -> None:
    """``model`` exported into ``out_dir``: one graph, or one per lesion type plus their index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Segmenter):
        (out_dir / SINGLE).write_bytes(to_onnx(model))
        return
    files = {t: f"segmenter-{i}.onnx" for i, t in enumerate(model.lesion_types)}
    for lesion_type, name in files.items():
        (out_dir / name).write_bytes(to_onnx(model.route(lesion_type)))
    (out_dir / ROUTER).write_text(json.dumps(files, indent=2, sort_keys=True))


class OnnxSegmenter:
    """A ``Segmenter``'s ``predict_proba`` through an ONNX Runtime session."""

    def __init__(self, onnx: bytes, module: Segmenter, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # None: the threads torch would use (OMP_NUM_THREADS, torch.set_num_threads), so switching
        # runtime does not change the process's CPU budget.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: the cores are shared (the server's other
        # inference worker, other pods under one CPU limit); spinning cost a third of the
        # frames/s on this project's shared 2-core machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.module = module  # its prepare() is the pre-processing; its weights are not used

    def predict_proba(self, images: list[np.ndarray], lesion_types: list[str | None] | None = None,
                      batch_size: int = 8) -> list[np.ndarray]:
        """As ``Segmenter.predict_proba``: one map per image, at the image's own size."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = np.stack([self.module.prepare(im) for im in chunk]).astype(np.float32)
            probs = self.session.run(None, {"x": x})[0]
            out += [resize_prob(p, im.shape[0], im.shape[1]) for p, im in zip(probs, chunk, strict=True)]
        return out


class OnnxRouter(Routing):
    """``LesionTypeRouter`` over ``OnnxSegmenter``s (same routing, same refusals)."""

    def __init__(self, models: dict[str, OnnxSegmenter]):
        self.models = models


def load(onnx_dir: Path, model: Segmenter | LesionTypeRouter, threads: int | None = None
         ) -> OnnxSegmenter | OnnxRouter:
    """The sessions of the export of ``model`` in ``onnx_dir`` (written by ``save``)."""
    files = graph_files(onnx_dir)
    if isinstance(model, Segmenter):
        return OnnxSegmenter(files[None].read_bytes(), model, threads)
    return OnnxRouter({t: OnnxSegmenter(path.read_bytes(), model.route(t), threads) for t, path in files.items()})


def predictor(model: Segmenter | LesionTypeRouter, onnx_dir: Path | None = None,
              runtime: str | None = None, threads: int | None = None
              ) -> Segmenter | LesionTypeRouter | OnnxSegmenter | OnnxRouter:
    """What answers for ``model``: its ONNX Runtime twin, loaded from the export in ``onnx_dir``
    (else exported now), or ``model`` itself when ``runtime`` is "torch" or onnxruntime is not
    installed. ``runtime`` None: the environment's ``LESIONFLOW_RUNTIME``, else "onnxruntime" (so
    a deployment can switch runtime without a new version, e.g. under ``mlflow models serve``)."""
    runtime = runtime or os.environ.get(RUNTIME_ENV) or "onnxruntime"
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} must be one of {', '.join(RUNTIMES)} ({RUNTIME_ENV})")
    if runtime == "torch":
        return model
    if not available():
        warnings.warn("onnxruntime is not installed: inference runs on torch", stacklevel=2)
        return model
    if onnx_dir is not None:
        return load(onnx_dir, model, threads)
    with tempfile.TemporaryDirectory(prefix="lesionflow-onnx-") as tmp:
        save(model, Path(tmp))
        return load(Path(tmp), model, threads)  # the sessions hold the graphs: tmp may go


def runtime_name(model: object) -> str:
    """"onnxruntime" or "torch": what a ``predictor`` result runs on (for /health and reports)."""
    return "onnxruntime" if isinstance(model, OnnxSegmenter | OnnxRouter) else "torch"
