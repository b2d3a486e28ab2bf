"""``lesionflow serve``: a registered version (by default the ``champion``) over HTTP.

A small FastAPI app around the registered pyfunc (``models/pyfunc.py``) rather than
``mlflow models serve``: that server takes pandas-shaped JSON at ``/invocations`` (an image would
travel as a base64 cell of a DataFrame), answers every bad input with the same generic error, and
cannot re-resolve the alias without a restart. Here the same pyfunc does the work, and:

``POST /predict``  the image as the raw body (``Content-Type: image/png``, ``image/jpeg``, …,
                   or ``application/octet-stream``; query ``lesion_type``, ``mask_format``) or as
                   JSON ``{"image": "<base64>", "lesion_type": "...", "mask_format": "png"}``.
                   Answer: ``{"model", "version", "lesion_type", "height", "width", "threshold",
                   "confidence", "lesion_fraction", "mask"}`` with ``mask`` either
                   ``{"format": "png", "data": "<base64 PNG, 0/255>"}`` or
                   ``{"format": "rle", "size": [h, w], "counts": "<COCO compressed RLE>"}``.
``GET /health``    what is served (name, version, alias, lesion types, threshold, limits).
``GET /ping``      200 once a model is loaded.
``POST /reload``   re-resolve the alias and load what it points at now (after a promotion or a
                   ``lesionflow rollback``); requests in flight finish on the model they started on.
                   Without it, the server checks the alias every ``serve.follow_seconds`` anyway.

Bad requests: 400 unreadable image / malformed JSON / bad ``mask_format``; 413 body larger than
``serve.max_upload_bytes``; 415 unsupported ``Content-Type``; 422 image sides outside
``[serve.min_side, serve.max_side]``, or a lesion type the model has no model for (a per-type
model also needs one). Every error body is ``{"detail": "<what was wrong and what is accepted>"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from lesionflow import registry
from lesionflow.config import ServeConfig
from lesionflow.errors import ImageSizeError, InvalidImageError, RegistryError
from lesionflow.models.pyfunc import (
    SegmentationModel,
    decode_image,
    encode_png,
    encode_rle,
)
from lesionflow.models.router import UnknownLesionTypeError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/octet-stream")
MASK_FORMATS = ("png", "rle")


@dataclass(frozen=True)
class Served:
    model: SegmentationModel
    name: str
    version: str


class ModelSlot:
    """The version being served; ``reload`` swaps it in one assignment, so a request reads either
    the old or the new model, never a mix."""

    def __init__(self, name: str, ref: str):
        self.name, self.ref = name, ref
        self._lock = threading.Lock()
        self.current = self._load()

    def _load(self) -> Served:
        version = registry.resolve(self.name, self.ref)
        return Served(registry.load_pyfunc(self.name, version), self.name, version)

    def reload(self) -> tuple[Served, Served]:
        with self._lock:
            before, self.current = self.current, self._load()
            return before, self.current


def follow(slot: ModelSlot, every: float, stop: threading.Event) -> None:
    """Keep serving what the alias points at: a promotion or a rollback reaches the server within
    ``every`` seconds, with no restart and no one calling /reload."""
    while not stop.wait(every):
        try:
            if registry.resolve(slot.name, slot.ref) != slot.current.version:
                before, after = slot.reload()
                print(f"{slot.name}@{slot.ref} moved: now serving v{after.version} "
                      f"(was v{before.version})", flush=True)
        except Exception as err:  # e.g. the tracking server is restarting: keep serving, retry
            print(f"could not follow {slot.name}@{slot.ref} ({err}); still serving "
                  f"v{slot.current.version}", flush=True)


def _error(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit`` (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _error(413, f"request body is {int(declared)} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _error(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _parse(content_type: str, body: bytes, query: dict) -> tuple[bytes, str | None, str]:
    """(image bytes, lesion type, mask format) from either request shape."""
    if content_type == "application/json":
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise _error(400, f"body is not valid JSON: {err}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise _error(400, 'JSON body must be an object with "image": <base64-encoded image>')
        try:
            image = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise _error(400, f'"image" is not valid base64: {err}') from None
        options = {**query, **{k: payload[k] for k in ("lesion_type", "mask_format") if k in payload}}
    elif content_type in IMAGE_TYPES:
        image, options = body, query
    else:
        raise _error(415, f"unsupported Content-Type {content_type or '(none)'!r}; send the image "
                          f"bytes as one of {', '.join(IMAGE_TYPES)}, or application/json with "
                          '{"image": <base64>}')
    mask_format = options.get("mask_format") or "png"
    if mask_format not in MASK_FORMATS:
        raise _error(400, f"mask_format {mask_format!r} is not one of {', '.join(MASK_FORMATS)}")
    return image, options.get("lesion_type") or None, mask_format


def create_app(name: str, ref: str, cfg: ServeConfig) -> FastAPI:
    """The app serving version or alias ``ref`` of registered model ``name``."""
    slot = ModelSlot(name, ref)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        if cfg.follow_seconds and not ref.isdigit():  # a pinned version number has nothing to follow
            threading.Thread(target=follow, args=(slot, cfg.follow_seconds, stop), daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="lesionflow", summary=f"lesion segmentation with {name}@{ref}", lifespan=lifespan)
    app.state.slot = slot

    def describe(served: Served) -> dict:
        return {"model": served.name, "version": served.version, "ref": ref,
                "lesion_types": served.model.lesion_types, "threshold": served.model.threshold}

    @app.get("/ping", response_class=PlainTextResponse)
    def ping() -> str:
        return "ok"

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **describe(slot.current),
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "min_side": cfg.min_side,
                           "max_side": cfg.max_side}}

    @app.post("/reload")
    async def reload() -> dict:
        try:
            before, after = await run_in_threadpool(slot.reload)
        except RegistryError as err:
            raise _error(409, f"cannot reload {name}@{ref}: {err}; still serving "
                              f"v{slot.current.version}") from None
        return {**describe(after), "previous_version": before.version}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        served = slot.current  # one model for the whole request, even if a reload lands meanwhile
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, cfg.max_upload_bytes)
        data, lesion_type, mask_format = _parse(content_type, body, dict(request.query_params))
        if lesion_type is None and served.model.lesion_types is not None:
            raise _error(422, f"{name} v{served.version} has one model per lesion type: send "
                              f"lesion_type, one of {served.model.lesion_types}")
        try:
            image = decode_image(data, min_side=cfg.min_side, max_side=cfg.max_side)
            pred = await run_in_threadpool(served.model.segment, image, lesion_type)
        except InvalidImageError as err:
            raise _error(400, str(err)) from None
        except (ImageSizeError, UnknownLesionTypeError) as err:
            raise _error(422, str(err)) from None
        if mask_format == "png":
            mask = {"format": "png", "data": base64.b64encode(encode_png(pred.mask)).decode("ascii")}
        else:
            mask = {"format": "rle", **encode_rle(pred.mask)}
        return {"model": served.name, "version": served.version, "lesion_type": lesion_type,
                "height": int(pred.mask.shape[0]), "width": int(pred.mask.shape[1]),
                "threshold": served.model.threshold, "confidence": pred.confidence,
                "lesion_fraction": float(pred.mask.mean()), "mask": mask}

    return app


def serve(name: str, ref: str, cfg: ServeConfig, host: str, port: int) -> None:
    """Load ``name@ref`` from the current tracking server and answer on ``host:port`` until stopped."""
    import uvicorn

    app = create_app(name, ref, cfg)
    print(f"serving {name}@{ref} (v{app.state.slot.current.version}) on http://{host}:{port}: "
          "POST /predict, GET /health, POST /reload", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
