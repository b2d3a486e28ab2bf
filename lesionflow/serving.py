"""``lesionflow serve``: a registered version (by default the ``champion``) over HTTP.

A small FastAPI app around the registered pyfunc (``models/pyfunc.py``) rather than
``mlflow models serve``: that server takes pandas-shaped JSON at ``/invocations`` (an image would
travel as a base64 cell of a DataFrame), answers every bad input with the same generic error, and
cannot re-resolve the alias without a restart. Here the same pyfunc does the work, and:

``POST /predict``  the image as the raw body (``Content-Type: image/png``, ``image/jpeg``, …,
                   or ``application/octet-stream``; query ``lesion_type``, ``mask_format``) or as
                   JSON ``{"image": "<base64>", "lesion_type": "...", "mask_format": "png"}``.
                   Answer: ``{"request_id", "model", "version", "lesion_type", "height", "width",
                   "threshold", "confidence", "lesion_fraction", "mask"}`` with ``mask`` either
                   ``{"format": "png", "data": "<base64 PNG, 0/255>"}`` or
                   ``{"format": "rle", "size": [h, w], "counts": "<COCO compressed RLE>"}``.
                   ``request_id`` is the client's ``X-Request-ID`` header or a new one (echoed in
                   that header); every answer is recorded under it in the prediction log
                   (``lesionflow/review/log.py``, queued off the request path).
``GET /health``    what is served (name, version, alias, lesion types, threshold, runtime:
                   onnxruntime or torch, limits).
``GET /ping``      200 once a model is loaded.
``POST /reload``   re-resolve the alias and load what it points at now (after a promotion or a
                   ``lesionflow rollback``); needs ``Authorization: Bearer <LESIONFLOW_RELOAD_TOKEN>``.
                   Without it, the server checks the alias every ``serve.follow_seconds`` anyway.

Under load: at most ``serve.inference_workers`` requests are segmented at once and at most
``serve.max_queue`` more wait for a worker; a request past that gets 503 with ``Retry-After`` at
once, so latency stays bounded by the queue instead of growing with the offered load.

Reloads: the new version is loaded and warmed up (one segmentation per lesion type) while the old
one keeps answering, then one reference is swapped. Every request runs on the model that was
current when it arrived, so a reload fails no request; a version that does not load or does not
answer its warm-up is refused and the old one keeps serving.

Bad requests: 400 unreadable image / malformed JSON / bad ``mask_format`` / bad
``X-Request-ID``; 413 body larger than
``serve.max_upload_bytes``; 415 unsupported ``Content-Type``; 422 image sides outside
``[serve.min_side, serve.max_side]``, or a lesion type the model has no model for (a per-type
model also needs one); 503 busy (above). ``/reload``: 401 without the right token; 403 when the
server has no token (``LESIONFLOW_RELOAD_TOKEN`` unset), also on loopback: a sidecar proxy or
another local user reaches 127.0.0.1 too; 409 when the alias names no version; 503 when the new
version cannot be loaded. Every error body is ``{"detail": "<what was wrong and what to do>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import re
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from lesionflow import registry
from lesionflow.config import ServeConfig
from lesionflow.errors import (
    ConfigError,
    ImageSizeError,
    InvalidImageError,
    RegistryError,
    ReloadError,
)
from lesionflow.models.pyfunc import (
    SegmentationModel,
    decode_image,
    encode_png,
    encode_rle,
)
from lesionflow.models.router import UnknownLesionTypeError
from lesionflow.review.log import PredictionLog

IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/octet-stream")
MASK_FORMATS = ("png", "rle")
RELOAD_TOKEN_ENV = "LESIONFLOW_RELOAD_TOKEN"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
WARM_UP_IMAGE = np.zeros((64, 64, 3), np.uint8)


@dataclass(frozen=True)
class Served:
    model: SegmentationModel
    name: str
    version: str


def warm_up(model: SegmentationModel) -> None:
    """One segmentation per lesion type: the first request after a swap pays no one-off start-up
    cost, and a version that loads but cannot answer is refused before it serves anyone."""
    for lesion_type in model.lesion_types or [None]:
        model.segment(WARM_UP_IMAGE, lesion_type)


class ModelSlot:
    """The version being served. Requests read ``current`` without a lock; ``reload`` loads and
    warms the new version while the old one answers, then swaps that one reference."""

    def __init__(self, name: str, ref: str):
        self.name, self.ref = name, ref
        # One reload at a time: two concurrent loads would hold three models in memory, and the
        # slower one could swap in an older resolution of the alias last.
        self._reloading = threading.Lock()
        self.current = self._load(registry.resolve(name, ref))

    def _load(self, version: str) -> Served:
        model = registry.load_pyfunc(self.name, version)
        warm_up(model)
        return Served(model, self.name, version)

    def reload(self) -> tuple[Served, Served]:
        """(before, after); the same twice when the ref still names the served version. Raises
        ``RegistryError`` when the ref names no version and ``ReloadError`` when the new version
        cannot be resolved, loaded or warmed up; either way the old version keeps serving."""
        with self._reloading:
            before = self.current
            try:
                version = registry.resolve(self.name, self.ref)
                if version == before.version:
                    return before, before
                self.current = self._load(version)
            except RegistryError:
                raise
            except Exception as err:  # tracking server, artifact store, torch: keep serving
                raise ReloadError(f"could not load what {self.name}@{self.ref} names now "
                                  f"({type(err).__name__}: {err})") from err
            return before, self.current


def follow(slot: ModelSlot, every: float, stop: threading.Event) -> None:
    """Keep serving what the alias points at: a promotion or a rollback reaches the server within
    ``every`` seconds, with no restart and no one calling /reload."""
    while not stop.wait(every):
        try:
            before, after = slot.reload()
            if after is not before:
                print(f"{slot.name}@{slot.ref} moved: now serving v{after.version} "
                      f"(was v{before.version})", flush=True)
        except Exception as err:  # e.g. the tracking server is restarting: keep serving, retry
            print(f"could not follow {slot.name}@{slot.ref} ({err}); still serving "
                  f"v{slot.current.version}", flush=True)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


class Admission:
    """Requests in the server's hands (reading their body, waiting for or on a worker), at most
    ``limit``; ``with admission:`` around one. Only the event loop's thread counts, so a plain
    integer is exact."""

    def __init__(self, cfg: ServeConfig):
        self.limit = cfg.inference_workers + cfg.max_queue
        self.in_flight = 0
        self._busy = (f"server busy: {self.limit} requests in progress (serve.inference_workers "
                      f"{cfg.inference_workers} + serve.max_queue {cfg.max_queue}); retry after "
                      f"{cfg.retry_after_seconds} s, or add replicas")
        self._retry_after = {"Retry-After": str(cfg.retry_after_seconds)}

    def __enter__(self) -> None:
        """Admit a request or refuse it with 503 at once: it never waits behind a full queue."""
        if self.in_flight >= self.limit:
            raise _error(503, self._busy, self._retry_after)
        self.in_flight += 1

    def __exit__(self, *exc) -> None:
        self.in_flight -= 1


def _authorize_reload(request: Request, token: str | None) -> None:
    if not token:
        raise _error(403, f"POST /reload is disabled: the server has no reload token. Set "
                          f"{RELOAD_TOKEN_ENV} in its environment (the Helm chart takes it from "
                          "its Secret) and send 'Authorization: Bearer <token>'; meanwhile the "
                          "alias is re-checked every serve.follow_seconds")
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    # bytes: compare_digest refuses non-ASCII str, which would make a bad header a 500
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
        raise _error(401, f"POST /reload needs 'Authorization: Bearer <token>' with the server's "
                          f"{RELOAD_TOKEN_ENV}", {"WWW-Authenticate": "Bearer"})


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


def _request_id(request: Request) -> str:
    """The client's ``X-Request-ID`` (so its own logs and ours join), else a new one."""
    sent = request.headers.get(REQUEST_ID_HEADER)
    if sent is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(sent):
        raise _error(400, f"{REQUEST_ID_HEADER} must be 1-128 characters of letters, digits and "
                          "._:- (or left out: the server makes one)")
    return sent


def _answer(served: Served, cfg: ServeConfig, content_type: str, body: bytes, query: dict,
            request_id: str, log: PredictionLog | None) -> dict:
    """Parse, decode, segment, encode: all the CPU work of one request, done on an inference
    worker so the event loop stays free to admit, refuse and answer health probes. The answer is
    queued for the prediction log (its writer thread hashes and appends)."""
    data, lesion_type, mask_format = _parse(content_type, body, query)
    if lesion_type is None and served.model.lesion_types is not None:
        raise _error(422, f"{served.name} v{served.version} has one model per lesion type: send "
                          f"lesion_type, one of {served.model.lesion_types}")
    try:
        image = decode_image(data, min_side=cfg.min_side, max_side=cfg.max_side)
        pred = served.model.segment(image, lesion_type)
    except InvalidImageError as err:
        raise _error(400, str(err)) from None
    except (ImageSizeError, UnknownLesionTypeError) as err:
        raise _error(422, str(err)) from None
    if mask_format == "png":
        mask = {"format": "png", "data": base64.b64encode(encode_png(pred.mask)).decode("ascii")}
    else:
        mask = {"format": "rle", **encode_rle(pred.mask)}
    answer = {"request_id": request_id, "model": served.name, "version": served.version,
              "lesion_type": lesion_type, "height": int(pred.mask.shape[0]),
              "width": int(pred.mask.shape[1]), "threshold": served.model.threshold,
              "confidence": pred.confidence, "lesion_fraction": float(pred.mask.mean()), "mask": mask}
    if log is not None:
        log.record({"request_id": request_id, "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "model": served.name, "model_version": served.version, "lesion_type": lesion_type,
                    "confidence": pred.confidence, "lesion_fraction": answer["lesion_fraction"],
                    "entropy": pred.entropy, "ambiguous_area": pred.ambiguous_area,
                    "height": answer["height"], "width": answer["width"]}, data, image)
    return answer


def create_app(name: str, ref: str, cfg: ServeConfig, reload_token: str | None = None,
               log: PredictionLog | None = None) -> FastAPI:
    """The app serving version or alias ``ref`` of registered model ``name``; ``POST /reload``
    accepts ``reload_token`` as bearer token and is disabled without one. Every answer goes to
    ``log`` (closed, its queue written, when the app shuts down)."""
    slot = ModelSlot(name, ref)
    admission = Admission(cfg)
    workers = ThreadPoolExecutor(cfg.inference_workers, thread_name_prefix="inference")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        if cfg.follow_seconds and not ref.isdigit():  # a pinned version number has nothing to follow
            threading.Thread(target=follow, args=(slot, cfg.follow_seconds, stop), daemon=True).start()
        yield
        stop.set()
        workers.shutdown(wait=False, cancel_futures=True)
        if log is not None:
            log.close()

    app = FastAPI(title="lesionflow", summary=f"lesion segmentation with {name}@{ref}", lifespan=lifespan)
    app.state.slot = slot

    def describe(served: Served) -> dict:
        return {"model": served.name, "version": served.version, "ref": ref,
                "lesion_types": served.model.lesion_types, "threshold": served.model.threshold,
                "runtime": served.model.runtime_name}

    @app.get("/ping", response_class=PlainTextResponse)
    def ping() -> str:
        return "ok"

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **describe(slot.current), "in_flight": admission.in_flight,
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "min_side": cfg.min_side,
                           "max_side": cfg.max_side, "inference_workers": cfg.inference_workers,
                           "max_queue": cfg.max_queue},
                "prediction_log": None if log is None else {
                    "dir": str(log.folder), "keep_images": log.keeps_images, "pending": log.pending,
                    "failed": log.failed}}

    @app.post("/reload")
    async def reload(request: Request) -> dict:
        _authorize_reload(request, reload_token)
        try:
            before, after = await run_in_threadpool(slot.reload)
        except RegistryError as err:
            raise _error(409, f"cannot reload {name}@{ref}: {err}; still serving "
                              f"v{slot.current.version}") from None
        except ReloadError as err:
            raise _error(503, f"cannot reload {name}@{ref}: {err}; still serving "
                              f"v{slot.current.version}",
                         {"Retry-After": str(cfg.retry_after_seconds)}) from None
        return {**describe(after), "previous_version": before.version}

    @app.post("/predict")
    async def predict(request: Request, response: Response) -> dict:
        with admission:
            served = slot.current  # one model for the whole request, even if a reload lands meanwhile
            request_id = _request_id(request)
            response.headers[REQUEST_ID_HEADER] = request_id
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await _read_body(request, cfg.max_upload_bytes)
            return await asyncio.get_running_loop().run_in_executor(
                workers, _answer, served, cfg, content_type, body, dict(request.query_params),
                request_id, log)

    return app


def serve(name: str, ref: str, cfg: ServeConfig, host: str, port: int,
          log: PredictionLog | None = None) -> None:
    """Load ``name@ref`` from the current tracking server and answer on ``host:port`` until
    stopped, recording every answer in ``log``; the reload token comes from the environment (a
    Secret on Kubernetes)."""
    import uvicorn

    listener = _listen(host, port)  # before the model loads: a busy port is reported at once
    token = os.environ.get(RELOAD_TOKEN_ENV, "").strip() or None  # a Secret made from a file ends in \n
    app = create_app(name, ref, cfg, reload_token=token, log=log)
    reload_note = "POST /reload" if token else f"POST /reload disabled (set {RELOAD_TOKEN_ENV})"
    log_note = f"; answers logged to {log.folder}" if log is not None else ""
    print(f"serving {name}@{ref} (v{app.state.slot.current.version}) on "
          f"http://{host}:{listener.getsockname()[1]}: POST /predict, GET /health, {reload_note}"
          f"{log_note}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as err:
        raise ConfigError(f"cannot serve on {host}:{port}: {err.strerror or err}. Pick another --port "
                          "(serve.port) or stop what listens there, or check --host (serve.host)") from None
    return listener
