"""The prediction log: every ``/predict`` answer, for the review queue and for monitoring.

Layout of ``serve.log_dir`` (default ``<workdir>/predictions``)::

    predictions-000001.jsonl   one ``LogRecord`` per line, append-only; a segment is closed before
    predictions-000002.jsonl   it would grow past ``serve.log_max_bytes`` and the next one opened
    .lock                      flock-ed while a line is appended: server processes (and replicas
                               sharing the folder) append whole lines, and exactly one rotates
    images/<sha256>.<ext>      with ``serve.keep_images``: the image (or s3://… via ``image_store``)

Only the newest segment is ever written again: ship or delete the others freely.

A record holds what the request carried and what the model answered — request id, time, model
version, lesion type, confidence, lesion fraction, the entropy and ambiguous area of the answer's
probability map (``lesionflow/uncertainty.py``; TTA costs 8 segmentations, so the review queue
computes it later from the kept image), the image's size and the SHA-256 of the bytes sent —
and nothing else: no client address, no headers. A kept image keeps the pixels the model saw
and none of the text a file can carry next to them: PNG and JPEG files are kept as sent minus
every metadata chunk or segment (PNG text/EXIF/time chunks; JPEG EXIF, XMP, IPTC, ICC and
comments: ``strip_metadata``), which costs microseconds where re-encoding a frame costs tens of
milliseconds and ten times the storage; other formats (TIFF tags can say anything) are re-encoded
as PNG.

The server appends off the request path: an answer is queued (``PredictionLog.record``) and one
writer thread per process hashes, keeps the image and appends, so a request pays for a queue put.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import queue
import re
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    """Appends lines to the newest segment while holding an exclusive ``flock`` on the folder's
    lock file, opening the next segment first when the line would take the current one past
    ``max_bytes``. Each line is one ``write`` on an ``O_APPEND`` descriptor under the lock, so
    writers in several processes never interleave partial lines, and exactly one of them rotates.
    The lock file and the current segment stay open between lines (a few system calls a line)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise PredictionLogError(f"cannot write the prediction log at {self.folder} "
                                     f"({err.strerror or err}): set serve.log_dir to a writable "
                                     "folder (on Kubernetes: a mounted volume)") from None
        self._threads = threading.Lock()  # flock does not exclude threads sharing one descriptor
        self._fd: int | None = None
        with self._locked():
            existing = _segments(self.folder)
            self._seq = existing[-1][0] if existing else 1
            last = self._path(self._seq)
            # a line torn by a crash would glue itself to the next record: start a fresh segment
            if last.exists() and last.stat().st_size and not _ends_with_newline(last):
                self._seq += 1

    def _path(self, seq: int) -> Path:
        return self.folder / SEGMENT.format(seq)

    def _locked(self):
        return _FileLock(self._lock_fd, self._threads)

    def _open(self, seq: int) -> int:
        if self._fd is not None:
            os.close(self._fd)
        self._seq = seq
        self._fd = os.open(self._path(seq), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def append(self, line: bytes) -> None:
        """Append one line (ending in a newline)."""
        with self._locked():
            seq = self._seq
            while self._path(seq + 1).exists():  # another process rotated meanwhile
                seq += 1
            fd = self._fd if self._fd is not None and seq == self._seq else self._open(seq)
            size = os.fstat(fd).st_size
            if size and size + len(line) > self.max_bytes:
                fd = self._open(seq + 1)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)


class _FileLock:
    def __init__(self, fd: int, threads: threading.Lock):
        self.fd, self.threads = fd, threads

    def __enter__(self) -> None:
        self.threads.acquire()
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.threads.release()


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


# PNG chunks a kept image keeps: pixels and how to show them; text, EXIF, time and the rest go
_PNG_KEEP = {b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"bKGD", b"pHYs", b"IDAT", b"IEND"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strip_png(data: bytes) -> bytes:
    out, at = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        end = at + 12 + length
        if end > len(data):
            raise ValueError("truncated chunk")
        if data[at + 4:at + 8] in _PNG_KEEP:
            out.append(data[at:end])
        at = end
    return b"".join(out)


def _strip_jpeg(data: bytes) -> bytes:
    """Every segment up to the scan but APP1-15 (EXIF, XMP, ICC, IPTC, …) and COM; APP0 (JFIF)
    and APP14 (Adobe: how to read the colours) stay; the scan and what follows are copied."""
    out, at = [data[:2]], 2
    while at < len(data):
        if data[at] != 0xFF:
            raise ValueError("not a marker")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            out.append(data[at:at + 2])
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        end = at + 2 + length
        if length < 2 or end > len(data):
            raise ValueError("bad segment length")
        if marker == 0xDA:  # start of scan: the compressed pixels, to the end
            out.append(data[at:])
            return b"".join(out)
        if not (0xE1 <= marker <= 0xEF and marker != 0xEE or marker == 0xFE):
            out.append(data[at:end])
        at = end
    raise ValueError("no scan")


def strip_metadata(data: bytes, image: np.ndarray) -> tuple[bytes, str]:
    """(bytes to keep, file extension): PNG and JPEG as sent minus their metadata, anything
    else (or a file whose structure does not parse) re-encoded as PNG from ``image``."""
    try:
        if data.startswith(_PNG_SIGNATURE):
            return _strip_png(data), "png"
        if data.startswith(b"\xff\xd8"):
            return _strip_jpeg(data), "jpg"
    except (ValueError, struct.error):
        pass
    return png_bytes(image), "png"


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

    def put(self, sha256: str, data: bytes, ext: str) -> str:
        """Store one image; the reference a ``LogRecord`` keeps."""
        name = f"{sha256}.{ext}"
        if self.location.startswith("s3://"):
            bucket, _, prefix = self.location[len("s3://"):].partition("/")
            key = f"{prefix.strip('/')}/{name}".lstrip("/")
            content_type = "image/png" if ext == "png" else "image/jpeg"
            self._client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
            return f"s3://{bucket}/{key}"
        path = Path(self.location).expanduser() / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(data)
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
        ref = self.images.put(sha, *strip_metadata(item.data, item.image)) if item.image is not None else None
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
        self.writer.close()
