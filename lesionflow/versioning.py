"""Dataset versioning with DVC: a dataset's identity is its DVC directory hash (``<md5>.dir``).

Pipeline steps run in containers without a git checkout, so versioning happens in a separate
*DVC workspace* (``dvc init --no-scm``) that holds the dataset as ``data/``. The dataset directory
itself is a KFP output artifact and is never written to: it is hardlinked into the workspace and
``dvc add --no-relink`` copies (or reflinks) it into the cache, so DVC never chmods or replaces
the shared inodes. The real ``dvc`` CLI is used rather than DVC's unstable Python internals.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import yaml
from pydantic import BaseModel, ConfigDict

from lesionflow.config import RuntimeConfig
from lesionflow.data.manifest import link_or_copy
from lesionflow.errors import DatasetVersionError, RemoteUnavailableError
from lesionflow.services import with_remote_retries

REMOTE_NAME = "storage"
OBJECTS = "files/md5"  # DVC 3's content-addressed layout on a remote: files/md5/<2 hex>/<30 hex>
_DIR_HASH = re.compile(r"[0-9a-f]{32}\.dir")
_STDERR_TAIL = 15  # lines of dvc's output kept in error messages
# dvc/s3fs/botocore wording of a remote that is down, slow or briefly failing (worth a retry);
# anything else (no such bucket, access denied, missing objects) is final.
_TRANSIENT = re.compile(
    r"could not connect|connection (refused|reset|aborted|was closed)|connect timeout|read timeout|"
    r"timed out|max retries exceeded|temporary failure|service ?unavailable|slow ?down|internal ?error|"
    r"\b50[0234]\b", re.IGNORECASE)
# What dvc says when an object store drops out mid-transfer (details only with -v); from a local
# folder remote the same words mean a missing object, which no retry brings back.
_PARTIAL_TRANSFER = re.compile(r"files? failed to (upload|download)", re.IGNORECASE)
_FINAL = re.compile(r"missing cache files|missing-files|no ?such ?bucket|access ?denied|forbidden|"
                    r"invalid ?access ?key|signature ?does ?not ?match|\b40[34]\b", re.IGNORECASE)
SERVICE_WAIT = RuntimeConfig.model_fields["service_wait_seconds"].default


class DatasetVersion(BaseModel):
    """What lineage records need: the hash, where it lives, and the .dvc text to restore it."""

    model_config = ConfigDict(frozen=True)

    md5: str
    remote: str
    n_files: int
    size: int
    dvc_file: str


def version_dataset(dataset_dir: Path, *, remote: str, endpoint_url: str | None = None,
                    workspace: Path | None = None, retry_seconds: float = SERVICE_WAIT) -> DatasetVersion:
    """Add ``dataset_dir`` to DVC and push it to ``remote`` (a folder or ``s3://bucket/prefix``).

    A persistent ``workspace`` keeps its cache and hash state between calls, so versioning
    unchanged data again re-hashes nothing and pushes nothing; ``None`` uses a temporary one.
    S3 credentials come from the environment and are never written into DVC config. A remote
    that is down is retried for ``retry_seconds``, then named (RemoteUnavailableError).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetVersionError(f"dataset directory {dataset_dir} does not exist")
    url = _remote_url(remote, endpoint_url)
    if workspace is None:
        with tempfile.TemporaryDirectory(prefix="lesionflow-dvc-") as tmp:
            return _version(dataset_dir, url, endpoint_url, Path(tmp), retry_seconds)
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    with _exclusive(workspace):  # concurrent local runs share it; data/ must not interleave
        return _version(dataset_dir, url, endpoint_url, workspace, retry_seconds)


def restore_dataset(md5: str, dest: Path, *, remote: str, endpoint_url: str | None = None,
                    retry_seconds: float = SERVICE_WAIT, keep_shards: bool = False) -> Path:
    """Materialise dataset version ``md5`` at ``dest`` from the remote alone (no git, no cache).

    Pulls into a temporary workspace next to ``dest`` and renames ``data/`` into place, so on
    any failure ``dest`` is left absent (or as the empty directory it was). A version stored as
    shards (``ingest.layout: shards``) is unpacked to the files layout every step reads, unless
    ``keep_shards``.
    """
    if not _DIR_HASH.fullmatch(md5):
        raise DatasetVersionError(f"{md5!r} is not a DVC directory hash (32 hex digits + '.dir')")
    dest = Path(dest).resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DatasetVersionError(f"restore destination {dest} already exists and is not empty")
    url = _remote_url(remote, endpoint_url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.restore-", dir=dest.parent) as tmp:
        ws = Path(tmp)
        # The cache is thrown away with the workspace: hardlinks avoid holding the data twice.
        _init_workspace(ws, url, endpoint_url, cache_type="hardlink,copy")
        (ws / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  hash: md5\n  path: data\n")
        try:
            _remote_call(["pull", "data.dvc"], ws, url, endpoint_url, retry_seconds)
        except RemoteUnavailableError:
            raise
        except DatasetVersionError as err:
            if "missing cache files" in str(err).lower():
                raise DatasetVersionError(
                    f"dataset version {md5} is not (fully) on remote {url}: it was never pushed "
                    f"there or objects were deleted\n{err}") from err
            raise
        for path in (ws / "data").rglob("*"):
            if path.is_file():  # DVC leaves cache-linked files read-only
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
        # torch and webdataset: imported only by restores
        from lesionflow.data import shards

        if shards.is_sharded(ws / "data") and not keep_shards:
            if dest.exists():
                dest.rmdir()  # empty (checked above); unshard writes it fresh
            return shards.unshard(ws / "data", dest)
        try:
            (ws / "data").rename(dest)
        except OSError as err:
            raise DatasetVersionError(f"cannot move restored dataset into {dest}: {err}") from err
    return dest


def remote_listing(md5: str, *, remote: str, endpoint_url: str | None = None) -> dict[str, str]:
    """{relative path: object md5} of dataset version ``md5``, read from the remote's ``.dir``
    object: what a reader needs to fetch single files of a version without pulling it."""
    if not _DIR_HASH.fullmatch(md5):
        raise DatasetVersionError(f"{md5!r} is not a DVC directory hash (32 hex digits + '.dir')")
    with open_remote_object(md5, remote=remote, endpoint_url=endpoint_url) as f:
        return {entry["relpath"]: entry["md5"] for entry in json.load(f)}


def open_remote_object(md5: str, *, remote: str, endpoint_url: str | None = None) -> BinaryIO:
    """A stream of one object of the remote (read as it arrives; nothing lands on disk)."""
    url = _remote_url(remote, endpoint_url)
    key = f"{OBJECTS}/{md5[:2]}/{md5[2:]}"
    if "://" not in url:
        try:
            return open(Path(url) / key, "rb")
        except FileNotFoundError:
            raise DatasetVersionError(f"object {md5} is not on remote {url}: the version was never "
                                      "pushed there or objects were deleted") from None
    if not url.startswith("s3://"):
        raise DatasetVersionError(f"objects can be streamed from s3:// or folder remotes, not {url}")
    import boto3  # S3 only
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    try:  # botocore retries transient failures itself
        return client.get_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{key}".lstrip("/"))["Body"]
    except ClientError as err:
        raise DatasetVersionError(f"object {md5} cannot be read from remote {url}: {err}") from None
    except BotoCoreError as err:
        raise RemoteUnavailableError(f"the DVC remote {url} (endpoint {endpoint_url}) is unavailable: "
                                     f"{err}") from None


def _version(dataset_dir: Path, url: str, endpoint_url: str | None, ws: Path,
             retry_seconds: float) -> DatasetVersion:
    # Never hardlink: DVC would make the artifact's files read-only and share them with the cache.
    _init_workspace(ws, url, endpoint_url, cache_type="reflink,copy")
    data = ws / "data"
    shutil.rmtree(data, ignore_errors=True)  # left over from an interrupted call
    try:
        shutil.copytree(dataset_dir, data, copy_function=link_or_copy)
        _dvc(["add", "--no-relink", "data"], ws)
        _remote_call(["push", "data.dvc"], ws, url, endpoint_url, retry_seconds)
    finally:
        # Hardlinks into a KFP artifact must not outlive the call in a persistent workspace.
        shutil.rmtree(data, ignore_errors=True)
    dvc_file = (ws / "data.dvc").read_text()
    out = yaml.safe_load(dvc_file)["outs"][0]
    return DatasetVersion(md5=out["md5"], remote=url, n_files=out["nfiles"], size=out["size"],
                          dvc_file=dvc_file)


def _remote_call(args: list[str], ws: Path, url: str, endpoint_url: str | None, seconds: float) -> None:
    """``dvc push``/``pull``: content-addressed, so retrying a half-done transfer is safe."""
    with_remote_retries(lambda: _dvc(args, ws), remote=url, endpoint_url=endpoint_url, seconds=seconds,
                        transient=lambda err: _transient(err, object_store="://" in url))


def _transient(err: BaseException, object_store: bool) -> bool:
    text = str(err)
    if not isinstance(err, DatasetVersionError) or _FINAL.search(text):
        return False
    return bool(_TRANSIENT.search(text) or (object_store and _PARTIAL_TRANSFER.search(text)))


def _remote_url(remote: str, endpoint_url: str | None) -> str:
    """Local remotes become absolute paths: DVC resolves relative ones against ``.dvc/``."""
    if "://" in remote:
        return remote
    if endpoint_url:
        raise DatasetVersionError(f"endpoint_url is only valid for s3:// remotes, not {remote!r}")
    return str(Path(remote).expanduser().resolve())


def _init_workspace(ws: Path, url: str, endpoint_url: str | None, cache_type: str) -> None:
    """``dvc init`` once, then write ``.dvc/config`` whole on every call: a reused workspace keeps
    no stale remote settings, and one file write replaces a slow ``dvc config`` run per key.
    ``cache_type`` is always explicit so a user's global ``cache.type`` cannot change behaviour."""
    if not (ws / ".dvc").is_dir():
        _dvc(["init", "--no-scm"], ws)
    settings = {"url": url, "endpointurl": endpoint_url}
    if any('"' in value for value in settings.values() if value):
        raise DatasetVersionError(f"remote {url!r} or endpoint {endpoint_url!r} contains a '\"'")
    lines = ["[core]", "    no_scm = True", f"    remote = {REMOTE_NAME}",
             "[cache]", f'    type = "{cache_type}"', f"['remote \"{REMOTE_NAME}\"']"]
    lines += [f'    {key} = "{value}"' for key, value in settings.items() if value]
    (ws / ".dvc" / "config").write_text("\n".join(lines) + "\n")


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _dvc_executable() -> str:
    exe = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if exe is None:
        raise DatasetVersionError(f"no `dvc` executable next to {sys.executable} or on PATH")
    return exe


def _dvc(args: list[str], cwd: Path) -> None:
    """Run ``dvc`` in ``cwd``; its site cache (hash state, index) lives inside the workspace so
    temporary workspaces leave nothing behind in /var/tmp and persistent ones keep their state."""
    cmd = [_dvc_executable(), *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(cwd / ".dvc" / "site-cache")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines()
                 if line.strip() and not line.startswith("Having any troubles?")]  # dvc's footer
        tail = "\n".join(lines[-_STDERR_TAIL:])
        raise DatasetVersionError(
            f"`{' '.join(['dvc', *args])}` failed with exit code {proc.returncode} in {cwd}:\n{tail}")
