"""The registered model as an MLflow pyfunc: image bytes in, mask + confidence out.

Pre-processing (decode, size limits, channel conventions), routing by lesion type and
post-processing (threshold, mask encoding, confidence) live here, inside the logged model, so a
registered version answers the same way in ``mlflow.pyfunc.load_model(...).predict``, in the
lesionflow server and in evaluation. The artifacts are the weights folder of ``models/store.py``
(weights + hyper-parameters, loaded with ``weights_only=True``) and the same model exported to ONNX
(``models/runtime.py``), which answers when onnxruntime is installed (torch otherwise); the pickled
``SegmentationModel`` instance itself holds no state, only a reference to this class.

``SIGNATURE`` (binary ``image``, optional string ``lesion_type``) lets standard MLflow serving —
``mlflow models serve``, MLServer's and KServe's MLflow runtimes — take base64 image bytes in JSON.

Confidence: the mean probability of the answer over the pixels that carry it — over the pixels
predicted as lesion when there are any (mean p), else over the whole image (mean 1 - p). 1 means
every deciding pixel was certain, values near the threshold mean the mask is a coin toss.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask

from lesionflow.errors import ImageSizeError, InvalidImageError
from lesionflow.models import runtime
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model
from lesionflow.uncertainty import map_uncertainty

WEIGHTS = "weights"  # the artifact key of the store.save_model folder
DEFAULT_THRESHOLD = 0.5
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "lesion_type", required=False)]),
    outputs=Schema([ColSpec(Object([Property("size", Array("long")), Property("counts", "string")]), "mask"),
                    ColSpec("long", "height"), ColSpec("long", "width"), ColSpec("double", "confidence")]))


@dataclass(frozen=True)
class Prediction:
    mask: np.ndarray  # bool, H x W at the image's own size
    confidence: float
    lesion_type: str | None
    entropy: float  # mean per-pixel entropy, bits (lesionflow/uncertainty.py): the prediction log's
    ambiguous_area: float  # share of the possible lesion left undecided: uncertainty, no extra pass


def decode_image(data: bytes, *, min_side: int = 1, max_side: int | None = None) -> np.ndarray:
    """Encoded image bytes → uint8 H x W (gray) or H x W x 3 array, within the side limits.

    The header is read before the pixels, so an oversized image is refused before it is decoded.
    """
    try:
        pil = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageSizeError(str(err)) from None
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidImageError(f"not a readable image ({len(data)} bytes): {err}") from None
    width, height = pil.size
    if min(width, height) < min_side or (max_side is not None and max(width, height) > max_side):
        raise ImageSizeError(f"image is {width}x{height} px; sides must be between {min_side} "
                             f"and {max_side if max_side is not None else 'any size'} px")
    try:
        pil.load()
    except (OSError, SyntaxError) as err:
        raise InvalidImageError(f"image data is truncated or corrupt: {err}") from None
    if pil.mode in ("I;16", "I;16B", "I", "F"):  # high bit depth → full range in 8 bits
        arr = np.asarray(pil, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        return ((arr - arr.min()) * (255.0 / span)).astype(np.uint8)
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("RGB")
    return np.asarray(pil)


def confidence(prob: np.ndarray, mask: np.ndarray) -> float:
    """See the module docstring: mean p over predicted lesion pixels, else mean 1 - p."""
    return float(prob[mask].mean()) if mask.any() else float(1.0 - prob.mean())


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE (column-major), as JSON: ``{"size": [h, w], "counts": "..."}``."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """Inverse of ``encode_rle``: bool H x W."""
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def encode_png(mask: np.ndarray) -> bytes:
    """Mask as an 8-bit PNG, 0 = background, 255 = lesion (the dataset's mask convention)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """A ``Segmenter`` or ``LesionTypeRouter`` with its pre- and post-processing.

    ``predict`` takes a DataFrame with an ``image`` column (encoded bytes) and an optional
    ``lesion_type`` column and returns ``mask`` (COCO RLE), ``height``, ``width``, ``confidence``
    per row; ``segment`` is the same for one decoded image, for callers in Python.
    """

    model: Segmenter | LesionTypeRouter  # the torch module (evaluation, pseudo-labelling)
    # what segments: the ONNX Runtime twin of ``model`` (models/runtime.py), or ``model`` itself
    predictor: Segmenter | LesionTypeRouter | runtime.OnnxSegmenter | runtime.OnnxRouter
    threshold: float

    def load_context(self, context) -> None:
        self.model = load_model(Path(context.artifacts[WEIGHTS]))
        onnx_dir = context.artifacts.get(runtime.ONNX)  # None: registered before the export
        self.predictor = self.model if onnx_dir is None else runtime.predictor(self.model, Path(onnx_dir))
        self.threshold = float((context.model_config or {}).get("threshold", DEFAULT_THRESHOLD))

    @classmethod
    def wrap(cls, model: Segmenter | LesionTypeRouter, threshold: float = DEFAULT_THRESHOLD
             ) -> SegmentationModel:
        """The same behaviour around a module already in memory (e.g. an older pickled version)."""
        wrapped = cls()
        wrapped.model, wrapped.predictor, wrapped.threshold = model, model, float(threshold)
        return wrapped

    @property
    def runtime_name(self) -> str:
        """"onnxruntime" or "torch": what segments."""
        return runtime.runtime_name(self.predictor)

    @property
    def lesion_types(self) -> list[str] | None:
        """The types this model routes between; None when one model serves every type."""
        return self.model.lesion_types if isinstance(self.model, LesionTypeRouter) else None

    def segment(self, image: np.ndarray, lesion_type: str | None = None) -> Prediction:
        """One uint8 image → its mask and confidence; a router refuses a type it has no model for
        (``UnknownLesionTypeError``)."""
        prob = self.predictor.predict_proba([image], [lesion_type])[0]
        mask = prob > self.threshold
        return Prediction(mask, confidence(prob, mask), lesion_type, *map_uncertainty(prob, self.threshold))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if "image" not in frame:
            raise InvalidImageError(f"input needs an 'image' column of encoded bytes; got {list(frame)}")
        types = frame["lesion_type"] if "lesion_type" in frame else [None] * len(frame)
        rows = []
        for data, lesion_type in zip(frame["image"], types, strict=True):
            pred = self.segment(decode_image(bytes(data)), None if pd.isna(lesion_type) else lesion_type)
            rows.append({"mask": encode_rle(pred.mask), "height": pred.mask.shape[0],
                         "width": pred.mask.shape[1], "confidence": pred.confidence})
        return pd.DataFrame(rows)
