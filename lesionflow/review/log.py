"""The prediction log: every ``/predict`` answer, for the review queue and for monitoring.

Layout of ``serve.log_dir`` (default ``<workdir>/predictions``)::

    predictions-000001.jsonl   one ``LogRecord`` per line, append-only; a segment is closed before
    predictions-000002.jsonl   it would grow past ``serve.log_max_bytes`` and the next one opened
    .lock                      held while a line is appended (``filelock``: server processes and
                               replicas sharing the folder append whole lines, rotate once)
    images/<sha256>.png        with ``serve.keep_images``: the image (or s3://… via ``image_store``)

A record holds what the request carried and what the model answered — request id, time, model
version, lesion type, confidence, lesion fraction, the entropy and ambiguous area of the answer's
probability map (``lesionflow/uncertainty.py``; TTA costs 8 segmentations, so the review queue
computes it later from the kept image), the image's size and the SHA-256 of the bytes sent —
and nothing else: no client address, no headers. A kept image is re-encoded as PNG from its
pixels, so text a client's file carried in metadata (PNG text chunks, EXIF) is not kept.

The server appends off the request path: an answer is queued (``PredictionLog.record``) and one
writer thread per process hashes, keeps the image and appends, so a request pays for a queue put.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from lesionflow.config import Params, ServeConfig
from lesionflow.errors import PredictionLogError

SEGMENT = "predictions-{:06d}.jsonl"
_SEGMENT_RE = re.compile(r"predictions-(\d{6,})\.jsonl")
LOCK = ".lock"
IMAGES = "images"


class LogRecord(BaseModel):
    """One answered ``/predict`` request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    time: str  # ISO 8601, UTC, when the answer was ready
    model: str
    model_version: str
    lesion_type: str | None
    confidence: float
    lesion_fraction: float
    entropy: float  # bits, of the answer's probability map
    ambiguous_area: float  # share of the possible lesion left undecided
    height: int
    width: int
    image_sha256: str  # of the image bytes as sent
    image: str | None = None  # kept image: a path relative to the log folder, or s3://…


def log_dir(params: Params) -> Path:
    """``serve.log_dir``, or ``<workdir>/predictions``."""
    configured = params.serve.log_dir
    return Path(configured).expanduser().resolve() if configured else params.runtime.resolved_workdir() / "predictions"


def _segments(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SEGMENT_RE.fullmatch(p.name))]
    return sorted(found)


class SegmentWriter:
    """Appends lines to the newest segment under the folder's lock, opening the next segment
    first when the line would take the current one past ``max_bytes``. Each line is one
    ``write`` on an ``O_APPEND`` descriptor while the lock is held, so writers in several
    processes never interleave partial lines, and exactly one of them rotates."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.folder / LOCK)
        with self._lock:
            existing = _segments(self.folder)
            self._seq = existing[-1][0] if existing else 1
            last = self._path(self._seq)
            # a line torn by a crash would glue itself to the next record: start a fresh segment
            if last.exists() and last.stat().st_size and not _ends_with_newline(last):
                self._seq += 1

    def _path(self, seq: int) -> Path:
        return self.folder / SEGMENT.format(seq)

    def append(self, line: bytes) -> Path:
        """Append one line (ending in a newline) and return the segment it went to."""
        with self._lock:
            while self._path(self._seq + 1).exists():  # another process rotated meanwhile
                self._seq += 1
            path = self._path(self._seq)
            size = path.stat().st_size if path.exists() else 0
            if size and size + len(line) > self.max_bytes:
                self._seq += 1
                path = self._path(self._seq)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return path


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_log(folder: str | Path) -> Iterator[LogRecord]:
    """Every record, oldest segment first, in the order written. A last line without its newline
    (a writer killed mid-line) is skipped; any other line that does not parse is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictionLogError(f"no prediction log at {folder}: `lesionflow serve` writes it to "
                                 "serve.log_dir (default <workdir>/predictions)")
    for _, path in _segments(folder):
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    yield LogRecord.model_validate_json(line)
                except ValidationError as err:
                    raise PredictionLogError(f"{path}:{number} is not a prediction record "
                                             f"({err.errors()[0]['msg']})") from None


# --- kept images --------------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ImageStore:
    """Where kept images go, named by the SHA-256 of the bytes sent (so an image sent twice is
    stored once): a folder, or an S3 prefix (``runtime.s3_endpoint_url`` for MinIO/moto)."""

    def __init__(self, location: str, log_folder: Path, endpoint_url: str | None = None):
        self.location, self.log_folder, self.endpoint_url = location, Path(log_folder), endpoint_url
        self._s3 = None

    @classmethod
    def for_config(cls, cfg: ServeConfig, log_folder: Path, endpoint_url: str | None) -> ImageStore:
        return cls(cfg.image_store or str(log_folder / IMAGES), log_folder, endpoint_url)

    def _client(self):
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
        return self._s3

    def put(self, sha256: str, png: bytes) -> str:
        """Store one image; the reference a ``LogRecord`` keeps."""
        name = f"{sha256}.png"
        if self.location.startswith("s3://"):
            bucket, _, prefix = self.location[len("s3://"):].partition("/")
            key = f"{prefix.strip('/')}/{name}".lstrip("/")
            self._client().put_object(Bucket=bucket, Key=key, Body=png, ContentType="image/png")
            return f"s3://{bucket}/{key}"
        path = Path(self.location).expanduser() / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(png)
            os.replace(tmp, path)  # a reader never sees half an image
        try:
            return str(path.resolve().relative_to(self.log_folder.resolve()))
        except ValueError:
            return str(path.resolve())

    def get(self, ref: str) -> bytes:
        """The bytes of a reference ``put`` returned (relative paths: to the log folder)."""
        try:
            if ref.startswith("s3://"):
                bucket, _, key = ref[len("s3://"):].partition("/")
                return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()
            return (self.log_folder / ref).read_bytes()
        except Exception as err:  # OSError, botocore's ClientError/BotoCoreError
            raise PredictionLogError(f"cannot read kept image {ref} ({type(err).__name__}: {err}); "
                                     "check serve.image_store and runtime.s3_endpoint_url") from None


# --- the server's recorder ----------------------------------------------------------------------


@dataclass
class _Pending:
    fields: dict  # LogRecord fields but the hash and the image reference
    data: bytes  # the image bytes as sent
    image: np.ndarray | None  # decoded pixels, when images are kept


class PredictionLog:
    """Records answers off the request path: ``record`` queues, one writer thread appends.

    ``close`` writes what is queued before it returns (the server calls it on shutdown). A record
    that cannot be written (disk full, S3 down) is counted in ``failed`` and reported on stderr:
    the answer has been sent, and serving goes on."""

    def __init__(self, folder: Path, max_bytes: int, images: ImageStore | None = None,
                 max_pending: int = 1024):
        self.folder = Path(folder)
        self.writer = SegmentWriter(self.folder, max_bytes)
        self.images = images
        self.failed = 0
        self._queue: queue.Queue[_Pending | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @classmethod
    def for_params(cls, params: Params) -> PredictionLog:
        folder = log_dir(params)
        images = (ImageStore.for_config(params.serve, folder, params.runtime.s3_endpoint_url)
                  if params.serve.keep_images else None)
        return cls(folder, params.serve.log_max_bytes, images)

    @property
    def keeps_images(self) -> bool:
        return self.images is not None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def record(self, fields: dict, data: bytes, image: np.ndarray) -> None:
        """Queue one answer (``LogRecord`` fields without ``image_sha256`` and ``image``); blocks
        only while ``max_pending`` answers wait for the disk."""
        self._queue.put(_Pending(fields, data, image if self.images is not None else None))

    def _write(self, item: _Pending) -> None:
        sha = hashlib.sha256(item.data).hexdigest()
        ref = self.images.put(sha, png_bytes(item.image)) if item.image is not None else None
        record = LogRecord(**item.fields, image_sha256=sha, image=ref)
        self.writer.append(record.model_dump_json().encode() + b"\n")

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(item)
            except Exception as err:  # keep serving; the count shows on /health
                self.failed += 1
                print(f"prediction log: could not record request {item.fields.get('request_id')} "
                      f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
