"""Turn an ingest source (local folder or ``s3://bucket/prefix``) into a local folder.

Ingestion then works on one code path: an S3 prefix is mirrored into a staging folder with the same
relative layout, so the manifest's ``source`` paths are identical whichever way the data arrived.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from lesionflow.errors import EmptySourceError, IngestError

_S3_HINT = ("Check ingest.source, runtime.s3_endpoint_url (for S3-compatible stores) and the "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b/")``; the trailing slash stops ``a/b`` from also
    matching ``a/b2/...``."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise IngestError(f"ingest source {url!r} has no bucket name")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def materialize_source(source: str, endpoint_url: str | None, staging: Path) -> Path:
    """Local folder → itself; S3 prefix → downloaded into ``staging`` (keeping relative paths)."""
    if not source.startswith("s3://"):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise EmptySourceError(f"ingest source folder {source} does not exist or is not a folder")
        return root
    return _download_prefix(source, endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), staging)


def _download_prefix(url: str, endpoint_url: str | None, staging: Path) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    client = boto3.client("s3", endpoint_url=endpoint_url)
    staging = Path(staging)
    try:
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")  # "folder" marker objects hold no data
        ]
    except (BotoCoreError, ClientError) as err:
        raise IngestError(f"cannot list ingest source {url}: {err}. {_S3_HINT}") from None
    if not keys:
        raise EmptySourceError(f"ingest source {url} holds no objects")

    def target(key: str) -> Path:
        rel = PurePosixPath(key[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            raise IngestError(f"refusing S3 key {key!r} of {url}: it would escape the staging folder")
        return staging.joinpath(*rel.parts)

    targets = [(key, target(key)) for key in keys]

    def fetch(item: tuple[str, Path]) -> None:
        key, dest = item
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, key, str(dest))
        except (BotoCoreError, ClientError) as err:
            raise IngestError(f"cannot download s3://{bucket}/{key}: {err}. {_S3_HINT}") from None

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, targets))
    return staging
