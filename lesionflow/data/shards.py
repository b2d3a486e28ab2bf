"""Sharded dataset layout: a canonical dataset stored as content-addressed WebDataset tar shards.

Millions of small PNGs make millions of objects to hash, push and pull; the same data as a few
hundred ~256 MB tars moves at bandwidth, not at per-object latency. A sharded dataset is::

    manifest.jsonl, fingerprint.json, ...   the files layout's top-level files, byte for byte
    shards.jsonl        one ShardInfo per line: name, split, record ids in order, bytes
    shards/<sha256>.tar WebDataset samples ``<key>.json`` (the Record), ``<key>.image.<ext>``,
                        ``<key>.mask.<ext>``; the PNG bytes of the files layout, not re-encoded

Shards hold one split each (training streams only train shards), records sorted by id, tar headers
fixed (mtime 0, one owner): rebuilding the same data gives byte-identical shards, and since each
is named by the sha256 of its bytes DVC dedups them. ``write_shards`` and ``unshard`` convert
between the layouts (records and file bytes unchanged); ``ShardStream`` trains from the shards of
a local folder or straight from the DVC remote (``RemoteShards``) without a full local copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pydantic import BaseModel, ConfigDict
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.writer import TarWriter

from lesionflow.data.augment import Augmenter, Strength
from lesionflow.data.manifest import (
    IGNORE_VALUE,
    MANIFEST,
    Record,
    link_or_copy,
    read_manifest,
    staged_dataset,
)
from lesionflow.data.transforms import resize_image, to_channels
from lesionflow.errors import ShardError
from lesionflow.models.segmenter import Segmenter

SHARDS = "shards"
SHARD_INDEX = "shards.jsonl"
SPLIT_ORDER = ("train", "val", "test")
_FILE_DIRS = ("images", "masks")  # what the files layout has and the sharded one replaces


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # <sha256 of the tar bytes>.tar
    split: str
    ids: list[str]  # record ids in the order they are stored
    bytes: int


def is_sharded(dataset_dir: str | Path) -> bool:
    return (Path(dataset_dir) / SHARD_INDEX).is_file()


def read_index(dataset_dir: str | Path) -> list[ShardInfo]:
    return _parse_index((Path(dataset_dir) / SHARD_INDEX).read_text(), str(dataset_dir))


def write_shards(files_dir: Path, out_dir: Path, shard_mb: float = 256) -> list[ShardInfo]:
    """Files layout ``files_dir`` → sharded layout ``out_dir`` (written fresh, all or nothing).

    A new shard starts once the current one holds ``shard_mb`` MiB of sample bytes."""
    files_dir, out_dir = Path(files_dir), Path(out_dir)
    if shard_mb <= 0:
        raise ShardError(f"shard_mb must be positive, not {shard_mb}")
    records = read_manifest(files_dir)
    _check_covered(files_dir, records)
    limit = shard_mb * 2**20
    with staged_dataset(out_dir) as tmp:
        for name in _FILE_DIRS:  # staged_dataset prepares the files layout; shards replace it
            (tmp / name).rmdir()
        _copy_extras(files_dir, tmp)
        (tmp / SHARDS).mkdir()
        index: list[ShardInfo] = []
        for split in SPLIT_ORDER:
            chunk: list[tuple[Record, dict[str, bytes]]] = []
            size = 0
            for record in sorted((r for r in records if r.split == split), key=lambda r: r.id):
                files = {f"{role}{Path(rel).suffix}": (files_dir / rel).read_bytes()
                         for role, rel in (("image", record.image), ("mask", record.mask)) if rel}
                chunk.append((record, files))
                size += sum(len(b) for b in files.values())
                if size >= limit:
                    index.append(_write_shard(tmp / SHARDS, split, chunk))
                    chunk, size = [], 0
            if chunk:
                index.append(_write_shard(tmp / SHARDS, split, chunk))
        (tmp / SHARD_INDEX).write_text("".join(s.model_dump_json() + "\n" for s in index))
    return index


def unshard(sharded_dir: Path, out_dir: Path) -> Path:
    """Sharded layout → files layout at ``out_dir`` (written fresh, all or nothing); every image
    and mask is checked against the sha256 its record carries."""
    sharded_dir, out_dir = Path(sharded_dir), Path(out_dir)
    source = LocalShards(sharded_dir)
    with staged_dataset(out_dir) as tmp:
        _copy_extras(sharded_dir, tmp)
        _unpack(source, source.index(), tmp)
    return out_dir


def _unpack(source: ShardSource, shards: list[ShardInfo], out: Path) -> None:
    """The images and masks of ``shards`` written into ``out`` at their records' paths."""
    for shard in shards:
        for record, files in _samples(source, shard):
            for rel, data in ((record.image, files["image"]), (record.mask, files.get("mask"))):
                if rel:
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).write_bytes(data)


class ShardSource(Protocol):
    """Where a sharded dataset's shards are read from: a folder or a DVC remote."""

    def index(self) -> list[ShardInfo]: ...

    def open(self, shard: ShardInfo) -> BinaryIO: ...

    def records(self) -> list[Record]: ...


class LocalShards:
    """A sharded dataset folder (``write_shards`` output, or a restored version kept sharded)."""

    def __init__(self, dataset_dir: str | Path):
        self.dir = Path(dataset_dir)
        if not is_sharded(self.dir):
            raise ShardError(f"{self.dir} is not a sharded dataset: it has no {SHARD_INDEX} "
                             "(write one with ingest.layout: shards or lesionflow.data.shards.write_shards)")

    def index(self) -> list[ShardInfo]:
        return read_index(self.dir)

    def open(self, shard: ShardInfo) -> BinaryIO:
        return open(self.dir / SHARDS / shard.name, "rb")

    def records(self) -> list[Record]:
        return read_manifest(self.dir)


class RemoteShards:
    """Dataset version ``md5`` read object by object from its DVC remote (a folder or
    ``s3://bucket/prefix``): the ``.dir`` listing maps each file to its content-addressed object,
    and shards are streamed from there, never pulled whole. Picklable: each DataLoader worker
    opens its own S3 client."""

    def __init__(self, md5: str, *, remote: str, endpoint_url: str | None = None):
        from lesionflow.versioning import remote_listing

        self.md5, self.remote, self.endpoint_url = md5, remote, endpoint_url
        self.objects = remote_listing(md5, remote=remote, endpoint_url=endpoint_url)
        if SHARD_INDEX not in self.objects:
            raise ShardError(f"dataset version {md5} on {remote} is stored as files, not shards "
                             f"(no {SHARD_INDEX}); stream it after ingesting with ingest.layout: shards")

    def _read(self, relpath: str) -> bytes:
        with self._open(relpath) as f:
            return f.read()

    def _open(self, relpath: str) -> BinaryIO:
        from lesionflow.versioning import open_remote_object

        return open_remote_object(self.objects[relpath], remote=self.remote, endpoint_url=self.endpoint_url)

    def index(self) -> list[ShardInfo]:
        return _parse_index(self._read(SHARD_INDEX).decode(), f"{self.remote} version {self.md5}")

    def open(self, shard: ShardInfo) -> BinaryIO:
        return self._open(f"{SHARDS}/{shard.name}")

    def records(self) -> list[Record]:
        lines = self._read(MANIFEST).decode().splitlines()
        return [Record.model_validate_json(line) for line in lines if line]

    def fetch(self, out_dir: Path, splits: tuple[str, ...]) -> Path:
        """The version in the files layout at ``out_dir`` (written fresh, all or nothing), but with
        the images and masks of ``splits`` only: what a trainer streaming the other splits needs
        on disk (manifest, fingerprint, reports, and the validation split it reads every epoch)."""
        with staged_dataset(Path(out_dir)) as tmp:
            for relpath in self.objects:
                if relpath != SHARD_INDEX and not relpath.startswith(f"{SHARDS}/"):
                    (tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / relpath).write_bytes(self._read(relpath))
            _unpack(self, [s for s in self.index() if s.split in splits], tmp)
        return Path(out_dir)


class ShardStream(IterableDataset):
    """``(image, target, weight)`` tensors of ``records``, exactly as ``training.SegmentationDataset``
    gives them, streamed from shards.

    Shards holding any of ``records`` go round-robin to the DDP ranks (``torch.distributed`` if
    initialised, or ``rank``/``world_size``), then to the rank's ``num_workers`` DataLoader workers
    (0: in-process): each worker reads only its own shards, in an order shuffled each epoch,
    through a ``shuffle_buffer`` of samples. A DataLoader batches within each worker, and ranks
    must run the same number of steps: so every worker yields whole batches of ``batch_size``, and
    every rank ``len(self)`` samples, the smallest rank's number of whole batches (the excess, a
    different part each epoch, is left out).
    """

    def __init__(self, source: ShardSource, records: list[Record], model: Segmenter,
                 augment: Strength = "none", seed: int = 0, sample_weights: list[float] | None = None,
                 shuffle_buffer: int = 256, batch_size: int = 1, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        if not records:
            raise ValueError("no labelled records to train or validate on")
        # only the input conventions: workers need no copy of the weights
        self.source, self.size, self.channels = source, model.image_size, model.in_channels
        self.weights = dict(zip((r.id for r in records), sample_weights or [1.0] * len(records)))
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.batch_size, self.workers = batch_size, max(num_workers, 1)
        self.augmenter = Augmenter(augment, seed)  # reseeded per worker by training.reseed_worker
        unlabelled = [r.id for r in records if r.mask is None]
        if unlabelled:
            raise ShardError(f"{len(unlabelled)} record(s) have no mask to train on, e.g. {unlabelled[0]} "
                             "(select them with training.labelled)")
        self.shards = [s for s in source.index() if not self.weights.keys().isdisjoint(s.ids)]
        missing = len(self.weights) - sum(self._count(s) for s in self.shards)
        if missing:
            raise ShardError(f"{missing} of the {len(self.weights)} records asked for are in no shard")
        if rank is None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        if len(self.shards) < self.world_size:
            raise ShardError(f"{len(self.shards)} shard(s) hold these records, fewer than the "
                             f"{self.world_size} ranks that should each read their own: lower "
                             "ingest.shard_mb and ingest again")
        if len(self) == 0:
            raise ShardError(f"no worker's shards hold a whole batch of {batch_size}: lower the batch "
                             "size, the number of workers, or ingest.shard_mb")

    def _count(self, shard: ShardInfo) -> int:
        return sum(i in self.weights for i in shard.ids)

    def rank_shards(self, rank: int) -> list[ShardInfo]:
        return self.shards[rank::self.world_size]

    def worker_shards(self, worker: int, rank: int | None = None) -> list[ShardInfo]:
        """The shards DataLoader worker ``worker`` of ``rank`` (this one by default) reads."""
        return self.rank_shards(self.rank if rank is None else rank)[worker::self.workers]

    def _whole_batches(self, rank: int) -> list[int]:
        return [sum(map(self._count, self.worker_shards(w, rank))) // self.batch_size
                for w in range(self.workers)]

    def __len__(self) -> int:
        return self.batch_size * min(sum(self._whole_batches(r)) for r in range(self.world_size))

    def _quota(self, worker: int) -> int:
        """This worker's samples: its part of ``len(self)`` in whole batches, in proportion to
        the whole batches its shards hold."""
        caps = self._whole_batches(self.rank)
        keep = len(self) // self.batch_size
        quotas = [c * keep // sum(caps) for c in caps]
        for w in range(self.workers):  # the rounding remainder, to workers that have batches left
            quotas[w] += min(keep - sum(quotas), caps[w] - quotas[w])
        return quotas[worker] * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise ShardError(f"this ShardStream was made for {self.workers} DataLoader worker(s), "
                             f"not {workers}: pass the loader's num_workers to it")
        # a worker's seed differs per worker and per epoch; in-process, count the epochs
        seed = info.seed if info else hash((self.seed, self.epoch)) % 2**32
        self.epoch += 1
        rng = np.random.default_rng(seed)
        shards = self.worker_shards(worker)
        quota = self._quota(worker)
        if quota == 0:
            return
        buffer: list[tuple[Record, dict[str, bytes]]] = []
        given = 0
        for k in rng.permutation(len(shards)):
            for sample in _samples(self.source, shards[k]):
                if sample[0].id not in self.weights:
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                sample, buffer[j] = buffer[j], sample
                yield self._tensors(*sample)
                given += 1
                if given == quota:
                    return
        for j in rng.permutation(len(buffer))[: quota - given]:
            yield self._tensors(*buffer[j])

    def _tensors(self, record: Record, files: dict[str, bytes]):
        # the same decoding as SegmentationDataset: Segmenter.prepare and transforms.load_target
        image = resize_image(to_channels(_decode(files["image"]), self.channels), self.size).transpose(2, 0, 1)
        mask = np.asarray(Image.fromarray(_decode(files["mask"])).resize((self.size, self.size), Image.NEAREST))
        target = np.where(mask == IGNORE_VALUE, -1, mask > 0).astype(np.int8)[None]
        image, target = self.augmenter(image, target)
        return torch.from_numpy(image), torch.from_numpy(target), torch.tensor(np.float32(self.weights[record.id]))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _samples(source: ShardSource, shard: ShardInfo) -> Iterator[tuple[Record, dict[str, bytes]]]:
    """(record, {"image": bytes, "mask": bytes}) per sample of ``shard``, read as a stream, each
    file checked against the sha256 its record carries."""
    with source.open(shard) as stream:
        samples = group_by_keys(tar_file_expander([{"url": shard.name, "stream": stream}]))
        n = -1
        for n, sample in enumerate(_named_tar_errors(samples, shard)):
            if "json" not in sample:
                raise ShardError(f"sample {n} of shard {shard.name} has no record (.json)")
            record = Record.model_validate_json(sample["json"])
            if n >= len(shard.ids) or record.id != shard.ids[n]:
                raise ShardError(f"shard {shard.name} does not match {SHARD_INDEX}: sample {n} is "
                                 f"{record.id!r}")
            files = {}
            for role, digest in (("image", record.image_sha256), ("mask", record.mask_sha256)):
                data = next((v for k, v in sample.items() if k.startswith(f"{role}.")), None)
                if digest is not None and (data is None or hashlib.sha256(data).hexdigest() != digest):
                    raise ShardError(f"the {role} of record {record.id} in shard {shard.name} is "
                                     "missing or corrupt (sha256 differs from the manifest's)")
                if data is not None:
                    files[role] = data
            yield record, files
        if n + 1 != len(shard.ids):
            raise ShardError(f"shard {shard.name} holds {n + 1} samples, {SHARD_INDEX} says {len(shard.ids)}")


def _named_tar_errors(samples: Iterator[dict], shard: ShardInfo) -> Iterator[dict]:
    try:
        yield from samples
    except (tarfile.TarError, KeyError, ValueError) as err:  # what a damaged tar raises in webdataset
        reason = err.args[0] if err.args else err  # webdataset appends the stream and url
        raise ShardError(f"shard {shard.name} is not a readable WebDataset tar: {reason}") from None


def _write_shard(folder: Path, split: str, chunk: list[tuple[Record, dict[str, bytes]]]) -> ShardInfo:
    """One tar of ``chunk``, named by the sha256 of its bytes."""
    tmp = folder / ".partial.tar"
    with open(tmp, "wb") as f, TarWriter(f, user="lesionflow", group="lesionflow", encoder=False,
                                         mtime=0) as writer:
        for n, (record, files) in enumerate(chunk):
            # positional keys: webdataset splits names at the first dot, and ids may hold dots
            writer.write({"__key__": f"{n:06d}", "json": record.model_dump_json(exclude_none=True).encode(),
                          **files})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"{digest}.tar"
    os.replace(tmp, folder / name)
    return ShardInfo(name=name, split=split, ids=[r.id for r, _ in chunk], bytes=(folder / name).stat().st_size)


def _check_covered(files_dir: Path, records: list[Record]) -> None:
    """Every image and mask file must belong to a record, or converting back would lose it."""
    named = {rel for r in records for rel in (r.image, r.mask) if rel}
    on_disk = {p.relative_to(files_dir).as_posix() for d in _FILE_DIRS
               for p in (files_dir / d).rglob("*") if p.is_file()}
    if on_disk - named:
        extra = sorted(on_disk - named)
        raise ShardError(f"{len(extra)} file(s) of {files_dir} belong to no record of its {MANIFEST} "
                         f"(e.g. {extra[0]}); shards hold records, so they would be lost")
    if named - on_disk:
        raise ShardError(f"{files_dir} lacks {len(named - on_disk)} file(s) its {MANIFEST} names "
                         f"(e.g. {sorted(named - on_disk)[0]})")


def _copy_extras(src: Path, dst: Path) -> None:
    """The top-level files (manifest, fingerprint, reports) are the same in both layouts."""
    skip = {*_FILE_DIRS, SHARDS, SHARD_INDEX}
    for path in sorted(src.iterdir()):
        if path.name in skip:
            continue
        if path.is_dir():
            shutil.copytree(path, dst / path.name, copy_function=link_or_copy)
        else:
            link_or_copy(path, dst / path.name)


def _parse_index(text: str, where: str) -> list[ShardInfo]:
    try:
        return [ShardInfo.model_validate_json(line) for line in text.splitlines() if line]
    except ValueError as err:
        raise ShardError(f"{SHARD_INDEX} of {where} is malformed: {err}") from None
