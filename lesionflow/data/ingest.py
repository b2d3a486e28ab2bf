"""Ingestion: a user's folder (or S3 prefix) of images, masks and metadata → a canonical dataset.

The pass is split in phases so a bad source never leaves a half-written dataset behind:

1. *plan*: list files, pair masks, read volume headers, join the metadata CSV — every structural
   problem (orphan mask, duplicate id, unknown CSV id, bad area ratio) surfaces here, before any
   pixel is decoded;
2. *convert*: decode, check, resize and encode in a thread pool into a temp sibling of
   ``out_dir`` (PIL releases the GIL, so this scales with cores);
3. *split*: groups (patients/videos, merged when two images are pixel-identical) are assigned to
   train/val/test by a seeded hash of the group id, so new data never moves an existing group;
4. *publish*: manifest, fingerprint, report (and the de-identified DICOM headers) are written and
   the temp dir is renamed into place.

Any exception removes the temp dir, so ``out_dir`` either holds a complete dataset or nothing.

A source that holds any DICOM file (or any source, with ``pseudonymize_ids``) is ingested through a
*pseudonymized view*: links to its files under keyed pseudonyms of their names and folders, and
its metadata CSV with ids and groups replaced. Everything ingest writes or says — record ids,
groups, ``source`` paths, skip reasons, error messages — is then built from pseudonyms alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from lesionflow.config import IngestConfig
from lesionflow.data.deid import Pseudonyms
from lesionflow.data.fingerprint import write_index
from lesionflow.data.io import (
    IMAGE_EXTS,
    VOLUME_EXTS,
    read_dicom,
    read_image,
    read_mask,
    read_volume,
    split_ext,
    to_uint8,
    volume_shape,
)
from lesionflow.data.manifest import (
    Record,
    check_fresh,
    staged_dataset,
    write_png,
)
from lesionflow.data.sources import materialize_source
from lesionflow.errors import (
    AreaRatioError,
    DuplicateIdError,
    EmptySourceError,
    IngestError,
    MaskSizeMismatchError,
    MetadataError,
    OrphanMaskError,
    PseudonymKeyError,
)
from lesionflow.formats import nnunet
from lesionflow.progress import progress

REPORT = "ingest_report.json"
DICOM_HEADERS = "dicom_headers.jsonl"  # one {"id", "header"} per DICOM record, de-identified
SPLITS = ("train", "val", "test")
TRUTHY = {"1", "1.0", "true", "yes"}  # "1.0": pandas writes int columns with gaps as floats


class IngestReport(BaseModel):
    """What an ingest produced and what it left out; also written as ``ingest_report.json``."""

    n_records: int
    counts: dict[str, dict[str, int]]  # {"split": {...}, "kind": {...}, "lesion_type": {...}}
    skipped: list[dict[str, str]] = []  # [{"path": <relative to source root>, "reason": ...}]
    merged_groups: list[list[str]] = []  # groups joined because they share identical images

    def summary(self) -> str:
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items())

        lines = [f"{self.n_records} records"]
        lines += [f"  {name}: {fmt(self.counts[name])}" for name in ("split", "kind", "lesion_type")]
        if self.merged_groups:
            lines.append(f"  merged {len(self.merged_groups)} group sets with identical images: "
                         + "; ".join("+".join(g) for g in self.merged_groups[:5]))
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} files:")
            lines += [f"    {s['path']}: {s['reason']}" for s in self.skipped[:10]]
        return "\n".join(lines)


@dataclass
class _Fields:
    """Per-record values known before decoding (from metadata and folder names)."""

    lesion_type: str | None = None
    group: str | None = None
    frame_index: int | None = None
    key_frame: bool = False
    area_ratio: float | None = None
    area_error: float | None = None


@dataclass
class _Item:
    """One source file: a 2-D image (one record) or a volume (one record per slice)."""

    path: Path
    rel: str
    stem: str
    is_volume: bool
    folder: dict[str, str]
    mask: Path | None = None
    slices: list[tuple[str, int]] = field(default_factory=list)  # (record id, slice index)
    fields: dict[str, _Fields] = field(default_factory=dict)


@dataclass
class _Converted:
    id: str
    image_sha256: str
    mask_sha256: str | None
    height: int
    width: int
    channels: int
    pixel_sha256: str | None  # None for constant images: they say nothing about a patient
    patient: str | None  # keyed pseudonym of a DICOM's PatientID
    spacing: tuple[float, float] | None  # (row, column) mm of the stored, possibly scaled image
    header: dict | None = None  # de-identified DICOM header


class _Problems:
    """Raise the first bad input (``on_error: raise``) or collect it (``on_error: skip``)."""

    def __init__(self, on_error: str, root: Path, display_root: str):
        self.on_error, self.root, self.display_root = on_error, root, display_root
        self.skipped: list[dict[str, str]] = []

    def rewrite(self, err: IngestError) -> IngestError:
        """Name files by where the user put them, not by the S3 staging folder."""
        if self.display_root != str(self.root):
            return type(err)(str(err).replace(str(self.root), self.display_root))
        return err

    def report(self, err: IngestError, path: Path) -> None:
        err = self.rewrite(err)
        if self.on_error == "raise":
            raise err
        self.skipped.append({"path": _rel(path, self.root), "reason": f"{type(err).__name__}: {err}"})


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _files(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, in a stable order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _mask_index(cfg: IngestConfig, images_root: Path, masks_root: Path, problems: _Problems
                ) -> tuple[dict[tuple[tuple[str, ...], str], Path], set[Path]]:
    """Map (sub-folders, image stem) → mask file, and return the set of all files that are masks
    (so a shared images/masks folder with a ``mask_suffix`` still works)."""
    same_folder = masks_root.resolve() == images_root.resolve()
    if same_folder and not cfg.mask_suffix:
        raise IngestError(f"masks_dir and images_dir are both {cfg.images_dir!r}: set mask_suffix "
                          "to tell masks from images")
    index: dict[tuple[tuple[str, ...], str], Path] = {}
    mask_files: set[Path] = set()
    for path in _files(masks_root):
        stem, ext = split_ext(path.name)
        if ext not in IMAGE_EXTS + VOLUME_EXTS:
            continue
        if cfg.mask_suffix and not stem.endswith(cfg.mask_suffix):
            if same_folder:
                continue  # an image living next to its mask
            problems.report(OrphanMaskError(
                f"mask {path} does not end with mask_suffix {cfg.mask_suffix!r}, so no image "
                "can match it"), path)
            mask_files.add(path)
            continue
        mask_files.add(path)
        key = (path.relative_to(masks_root).parent.parts, stem[: len(stem) - len(cfg.mask_suffix)])
        if key in index:
            problems.report(DuplicateIdError(
                f"masks {index[key]} and {path} both belong to image stem {key[1]!r}"), path)
            continue
        index[key] = path
    return index, mask_files


def _plan(cfg: IngestConfig, root: Path, problems: _Problems) -> tuple[list[_Item], set[str]]:
    """(usable items, every id a metadata row may name — including those of skipped files)."""
    images_root, masks_root = root / cfg.images_dir, root / cfg.masks_dir
    masks, mask_files = _mask_index(cfg, images_root, masks_root, problems)
    candidates = [p for p in _files(images_root)
                  if p not in mask_files and split_ext(p.name)[1] in IMAGE_EXTS + VOLUME_EXTS]
    if not candidates:
        raise EmptySourceError(
            f"ingest source {problems.display_root} has no images under {cfg.images_dir!r} "
            f"(supported: {', '.join(IMAGE_EXTS + VOLUME_EXTS)})")

    items: list[_Item] = []
    owner: dict[str, Path] = {}
    known: set[str] = set()
    for path in candidates:
        stem, ext = split_ext(path.name)
        known.add(stem)
        parts = path.relative_to(images_root).parent.parts
        mask = masks.pop((parts, stem), None)
        try:
            if cfg.folder_fields and len(parts) != len(cfg.folder_fields):
                raise IngestError(
                    f"{path} is {len(parts)} folder(s) deep under {cfg.images_dir!r}, but "
                    f"folder_fields {cfg.folder_fields} expects {len(cfg.folder_fields)}")
            item = _Item(path=path, rel=_rel(path, root), stem=stem, is_volume=ext in VOLUME_EXTS,
                         folder=dict(zip(cfg.folder_fields, parts)), mask=mask)
            if item.is_volume:
                n = volume_shape(path)[cfg.volume_slice_axis]
                item.slices = [(f"{stem}_s{k:03d}", k) for k in range(n)]
                known.update(record_id for record_id, _ in item.slices)
                if mask is not None and split_ext(mask.name)[1] not in VOLUME_EXTS:
                    raise MaskSizeMismatchError(f"volume {path} has a 2-D mask {mask}")
            else:
                if mask is not None and split_ext(mask.name)[1] in VOLUME_EXTS:
                    raise MaskSizeMismatchError(f"2-D image {path} has a volume mask {mask}")
                item.slices = [(stem, 0)]
            for record_id, _ in item.slices:
                if record_id in owner:
                    raise DuplicateIdError(
                        f"{owner[record_id]} and {path} both give record id {record_id!r}")
        except IngestError as err:
            problems.report(err, path)
            continue
        owner.update({record_id: path for record_id, _ in item.slices})
        items.append(item)

    for path in sorted(masks.values()):
        problems.report(
            OrphanMaskError(f"mask {path} has no matching image in {cfg.images_dir!r}"), path)
    return items, known


def _read_metadata(cfg: IngestConfig, root: Path, display_root: str) -> dict[str, dict[str, str]]:
    """CSV rows keyed by id, restricted to the configured columns (id column excluded)."""
    if cfg.metadata_csv is None:
        return {}
    path = root / cfg.metadata_csv
    name = f"{display_root}/{cfg.metadata_csv}"
    if not path.is_file():
        raise MetadataError(f"metadata CSV {name} does not exist (ingest.metadata_csv is relative "
                            "to the source root; null if there is none)")
    wanted = {k: v for k, v in cfg.columns.model_dump().items() if v is not None}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for key, column in wanted.items():
                if column not in header:
                    raise MetadataError(f"column {column!r} (columns.{key}) is missing from metadata "
                                        f"CSV {name}; it has {header}")
            rows: dict[str, dict[str, str]] = {}
            for row in reader:
                record_id = (row[cfg.columns.id] or "").strip()
                if record_id in rows:
                    raise MetadataError(f"id {record_id!r} appears twice in metadata CSV {name}")
                rows[record_id] = {k: (row[c] or "").strip() for k, c in wanted.items() if k != "id"}
    except UnicodeDecodeError as err:
        raise MetadataError(f"metadata CSV {name} is not UTF-8 text (byte {err.start} of it): save "
                            "it as UTF-8 CSV") from None
    except csv.Error as err:
        raise MetadataError(f"metadata CSV {name} is not a readable CSV: {err}") from None
    return rows


def _parse_fields(row: dict[str, str], record_id: str, where: Path) -> _Fields:
    def ratio(key: str) -> float | None:
        if not row.get(key):
            return None
        try:
            value = float(row[key])
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:  # also rejects nan
            raise AreaRatioError(f"{key} {row[key]!r} of {record_id!r} ({where}) is not in [0, 1]")
        return value

    frame = None
    if row.get("frame"):
        try:
            value = float(row["frame"])  # "3.0" too: pandas writes int columns with gaps as floats
        except ValueError:
            value = math.nan
        if not value.is_integer():
            raise MetadataError(f"frame {row['frame']!r} of {record_id!r} ({where}) is not an "
                                "integer")
        frame = int(value)
    return _Fields(lesion_type=row.get("lesion_type") or None, group=row.get("group") or None,
                   frame_index=frame, key_frame=row.get("key_frame", "").lower() in TRUTHY,
                   area_ratio=ratio("area_ratio"), area_error=ratio("area_error"))


def _join_metadata(items: list[_Item], known: set[str], rows: dict[str, dict[str, str]],
                   cfg: IngestConfig, display_root: str, problems: _Problems) -> list[_Item]:
    """Attach metadata to every record; a CSV id may name a 2-D image, a volume or one slice."""
    unknown = sorted(set(rows) - known)
    if unknown:
        raise MetadataError(
            f"{len(unknown)} id(s) in metadata CSV {display_root}/{cfg.metadata_csv} match no "
            f"image: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    kept = []
    for item in items:
        try:
            for record_id, _ in item.slices:
                row = rows.get(record_id) or rows.get(item.stem) or {}
                item.fields[record_id] = _parse_fields(row, record_id, item.path)
        except IngestError as err:
            problems.report(err, item.path)
            continue
        kept.append(item)
    return kept


def _fit(image: np.ndarray, mask: np.ndarray | None, max_side: int | None
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale so the longer side is at most ``max_side`` (image bilinear, mask nearest)."""
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image, mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            size, Image.Resampling.NEAREST)) > 0
    return image, mask


def _pixel_hash(image: np.ndarray) -> str | None:
    if image.min() == image.max():
        return None
    h = hashlib.sha256(repr(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def _check_size(record_id: str, image: np.ndarray, mask: np.ndarray | None, item: _Item) -> None:
    if mask is not None and mask.shape != image.shape[:2]:
        raise MaskSizeMismatchError(
            f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]} but image {item.path} is "
            f"{image.shape[1]}x{image.shape[0]} (record {record_id!r})")


def _emit(record_id: str, image: np.ndarray, mask: np.ndarray | None, out: Path,
          max_side: int | None, patient: str | None, spacing: tuple[float, float] | None,
          header: dict | None) -> _Converted:
    pixel_sha = _pixel_hash(image)
    h, w = image.shape[:2]
    image, mask = _fit(image, mask, max_side)
    if spacing is not None:  # the same anatomy over fewer pixels: each pixel covers more mm
        spacing = (spacing[0] * h / image.shape[0], spacing[1] * w / image.shape[1])
    return _Converted(
        id=record_id, pixel_sha256=pixel_sha, patient=patient, spacing=spacing, header=header,
        height=image.shape[0], width=image.shape[1], channels=1 if image.ndim == 2 else image.shape[2],
        image_sha256=write_png(image, out / "images" / f"{record_id}.png"),
        mask_sha256=None if mask is None else write_png(
            mask.astype(np.uint8) * 255, out / "masks" / f"{record_id}.png"),
    )


def _convert(item: _Item, out: Path, max_side: int | None, axis: int,
             pseudonyms: Pseudonyms | None) -> list[_Converted] | IngestError:
    """Decode, check and write one source file; errors are returned so the caller keeps order."""
    patient = header = None
    try:
        if item.is_volume:
            volume, voxel = read_volume(item.path)
            masks = None if item.mask is None else read_volume(item.mask)[0] != 0
            if masks is not None and masks.shape != volume.shape:
                raise MaskSizeMismatchError(
                    f"mask volume {item.mask} has shape {masks.shape} but volume {item.path} has "
                    f"{volume.shape}")
            volume = to_uint8(volume)  # one scale per volume keeps slices comparable
            pairs = [(record_id, np.take(volume, k, axis=axis),
                      None if masks is None else np.take(masks, k, axis=axis))
                     for record_id, k in item.slices]
            # a slice's rows and columns are the two remaining axes, in RAS+ order
            spacing = None if voxel is None else tuple(v for i, v in enumerate(voxel) if i != axis)
        else:
            if split_ext(item.path.name)[1] == ".dcm":  # a DICOM source always has pseudonyms
                dicom = read_dicom(item.path, pseudonyms)
                image, patient, spacing = dicom.image, dicom.patient, dicom.spacing
                header = dicom.header
            else:
                image, spacing = read_image(item.path), None
            mask = None if item.mask is None else read_mask(item.mask)
            pairs = [(item.slices[0][0], image, mask)]
        for record_id, image, mask in pairs:  # validate everything before writing anything
            _check_size(record_id, image, mask, item)
        return [_emit(record_id, np.ascontiguousarray(image), mask, out, max_side, patient, spacing,
                      header) for record_id, image, mask in pairs]
    except IngestError as err:
        return err


def _convert_all(items: list[_Item], out: Path, cfg: IngestConfig, problems: _Problems,
                 pseudonyms: Pseudonyms | None) -> list[tuple[_Item, _Converted]]:
    results: list[tuple[_Item, _Converted]] = []
    pool = ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2))
    try:
        outputs = pool.map(
            lambda it: _convert(it, out, cfg.max_side, cfg.volume_slice_axis, pseudonyms), items)
        for item, output in progress(zip(items, outputs), "ingest", total=len(items)):
            if isinstance(output, IngestError):
                problems.report(output, item.path)
            else:
                results += [(item, c) for c in output]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may write after cleanup
    return results


def _union_groups(groups: dict[str, str], pixel_hashes: dict[str, str | None]
                  ) -> tuple[dict[str, str], list[list[str]]]:
    """Merge groups that share a pixel-identical image; each merged set is named by its
    smallest member. Returns (record id → final group, merged sets)."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    first_group_of: dict[str, str] = {}
    for record_id in sorted(groups):
        digest, group = pixel_hashes[record_id], groups[record_id]
        find(group)
        if digest is None:
            continue
        if digest in first_group_of:
            a, b = find(first_group_of[digest]), find(group)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_group_of[digest] = group
    members: dict[str, set[str]] = defaultdict(set)
    for g in parent:
        members[find(g)].add(g)
    merged = sorted(sorted(m) for m in members.values() if len(m) > 1)
    return {rid: find(g) for rid, g in groups.items()}, merged


def _split_point(group: str, seed: int) -> float:
    """Where ``group`` falls in [0, 1): a hash of its id keyed by the seed, uniform and blind to
    every other group (53 bits, so the float is exact and never rounds up to 1)."""
    digest = hashlib.blake2b(group.encode(), digest_size=8, key=str(seed).encode()).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def assign_splits(groups: Iterable[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Group → split, from the group id, the seed and the fractions alone.

    The fractions cut [0, 1) into train|val|test and each group goes where its keyed hash
    (``_split_point``) falls, so adding, removing or correcting data never moves another group.
    Lesion types are stratified in expectation: the hash is uniform within every type.

    The one exception, for small datasets: with at least three groups, a split with a non-zero
    fraction that no hash fell into takes the group whose point lies nearest its interval (from a
    split that keeps at least one). Only then does a group's split depend on the other groups.
    """
    active = [s for s in SPLITS if fractions[s] > 0]
    bounds, low = {}, 0.0
    for s in SPLITS:
        bounds[s] = (low, low + fractions[s])
        low += fractions[s]
    points = {g: _split_point(g, seed) for g in sorted(set(groups))}
    # the last active split also takes points beyond a sum of fractions rounded below 1
    assignment = {g: next((s for s in active if u < bounds[s][1]), active[-1])
                  for g, u in points.items()}

    def gap(g: str, s: str) -> float:
        return max(bounds[s][0] - points[g], points[g] - bounds[s][1], 0.0)

    if len(assignment) >= 3:
        for s in active:
            size = Counter(assignment.values())
            if size[s] == 0:
                donors = [g for g in assignment if size[assignment[g]] > 1]
                assignment[min(donors, key=lambda g: (gap(g, s), g))] = s
    return assignment


def _kind(fields: _Fields, has_mask: bool, frame_configured: bool) -> str:
    if frame_configured and fields.frame_index is not None:
        return "video_frame"
    if has_mask:
        return "still"
    if fields.area_ratio is not None:
        return "weak"
    return "unlabelled"


def _build_records(converted: list[tuple[_Item, _Converted]], cfg: IngestConfig
                   ) -> tuple[list[Record], list[list[str]]]:
    lesion_types, groups, hashes = {}, {}, {}
    for item, c in converted:
        f = item.fields[c.id]
        lesion_types[c.id] = f.lesion_type or item.folder.get("lesion_type") or cfg.default_lesion_type
        groups[c.id] = (f.group or item.folder.get("group") or c.patient
                        or (item.stem if item.is_volume else c.id))
        hashes[c.id] = c.pixel_sha256
    final_group, merged = _union_groups(groups, hashes)
    split_of = assign_splits(final_group.values(), cfg.split.model_dump(), cfg.split_seed)

    records = []
    for item, c in converted:
        f = item.fields[c.id]
        records.append(Record(
            id=c.id, kind=_kind(f, c.mask_sha256 is not None, cfg.columns.frame is not None),
            image=f"images/{c.id}.png", mask=None if c.mask_sha256 is None else f"masks/{c.id}.png",
            image_sha256=c.image_sha256, mask_sha256=c.mask_sha256,
            height=c.height, width=c.width, channels=c.channels,
            lesion_type=lesion_types[c.id], group=final_group[c.id],
            split=split_of[final_group[c.id]], frame_index=f.frame_index, key_frame=f.key_frame,
            area_ratio=f.area_ratio, area_error=f.area_error, source=item.rel, spacing=c.spacing,
            labelled_by=None if c.mask_sha256 is None else f"annotator:{cfg.annotator}",
        ))
    return sorted(records, key=lambda r: r.id), merged


def _into_video_folder(record: Record, dataset_dir: Path) -> Record:
    """Frames move to one folder per video: a video is browsed, fetched and reviewed as a unit."""
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", record.group)
    moved = {}
    for key in ("image", "mask"):
        rel = getattr(record, key)
        if rel is not None:
            top, name = rel.split("/", 1)
            moved[key] = f"{top}/{folder}/{name}"
            (dataset_dir / moved[key]).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dataset_dir / rel, dataset_dir / moved[key])
    return record.model_copy(update=moved)


def _check_out_dir(out_dir: Path) -> None:
    try:
        check_fresh(out_dir)
    except FileExistsError as err:
        raise IngestError(str(err)) from None


def _holds_dicom(cfg: IngestConfig, root: Path) -> bool:
    return any(split_ext(p.name)[1] == ".dcm"
               for folder in {root / cfg.images_dir, root / cfg.masks_dir} for p in _files(folder))


def _pseudonymized_view(cfg: IngestConfig, root: Path, view: Path, pseudonyms: Pseudonyms) -> Path:
    """Links to the source's images and masks under pseudonyms of their folder names and stems (a
    mask keeps its ``mask_suffix``, a ``lesion_type`` folder its name), and the metadata CSV with
    its ids and groups replaced by the same pseudonyms, so every id still finds its file."""
    volume_stems: set[str] = set()
    for top in dict.fromkeys((cfg.images_dir, cfg.masks_dir)):
        folder = root / top
        for path in _files(folder):
            stem, ext = split_ext(path.name)
            if ext not in IMAGE_EXTS + VOLUME_EXTS:
                continue
            if ext in VOLUME_EXTS:
                volume_stems.add(stem)
            parts = path.relative_to(folder).parent.parts
            fields = cfg.folder_fields if len(parts) == len(cfg.folder_fields) else []
            dirs = [p if f == "lesion_type" else pseudonyms.name(p)
                    for p, f in zip(parts, fields or [None] * len(parts))]
            suffix = cfg.mask_suffix
            if top == cfg.masks_dir and suffix and stem.endswith(suffix):
                name = pseudonyms.name(stem[: -len(suffix)]) + suffix + ext
            else:
                name = pseudonyms.name(stem) + ext
            link = view.joinpath(top, *dirs, name)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():  # a file under both folders (one nested in the other)
                link.symlink_to(path)
    if cfg.metadata_csv is not None and (root / cfg.metadata_csv).is_file():

        def record_id(value: str) -> str:
            slice_of = re.fullmatch(r"(.+)(_s\d{3})", value)
            if slice_of and slice_of.group(1) in volume_stems:
                return pseudonyms.name(slice_of.group(1)) + slice_of.group(2)
            return pseudonyms.name(value) if value else value

        replace = {cfg.columns.id: record_id}
        if cfg.columns.group is not None:
            replace[cfg.columns.group] = lambda v: pseudonyms.name(v) if v else v
        target = view / cfg.metadata_csv
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(root / cfg.metadata_csv, newline="", encoding="utf-8-sig") as src, \
                    open(target, "w", newline="", encoding="utf-8") as dst:
                reader = csv.DictReader(src)
                writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or [])
                writer.writeheader()
                for row in reader:
                    writer.writerow({k: replace[k]((v or "").strip()) if k in replace else v
                                     for k, v in row.items()})
        except (UnicodeDecodeError, csv.Error):  # linked as it is: reading it names the problem
            target.unlink()
            target.symlink_to(root / cfg.metadata_csv)
    return view


def _write_headers(dataset_dir: Path, converted: list[tuple[_Item, _Converted]]) -> None:
    headers = sorted((c.id, c.header) for _, c in converted if c.header is not None)
    if headers:
        (dataset_dir / DICOM_HEADERS).write_text("".join(
            json.dumps({"id": i, "header": h}, sort_keys=True) + "\n" for i, h in headers))


def ingest(cfg: IngestConfig, out_dir: Path, *, endpoint_url: str | None = None,
           key: bytes | None = None) -> IngestReport:
    """Build the canonical dataset for ``cfg.source`` in ``out_dir`` (absent or empty), split by
    a hash keyed by ``cfg.split_seed``. ``key``
    (``deid.load_key``) keys the pseudonyms a DICOM source, or ``pseudonymize_ids``, needs."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    display_root = cfg.source.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="lesionflow-source-") as staging, \
            tempfile.TemporaryDirectory(prefix="lesionflow-view-") as view, \
            tempfile.TemporaryDirectory(prefix="lesionflow-layout-") as layout:
        root = materialize_source(cfg.source, endpoint_url, Path(staging)).resolve()
        if not cfg.source.startswith("s3://"):
            display_root = str(root)
        root, cfg = nnunet.as_ingest_source(root, cfg, Path(layout))  # other sources: unchanged
        pseudonyms = None
        if cfg.pseudonymize_ids or _holds_dicom(cfg, root):
            if key is None:
                raise PseudonymKeyError(
                    f"ingest source {display_root} needs pseudonyms (it holds DICOM files, or "
                    "ingest.pseudonymize_ids is true) but no key was given: pass "
                    "key=lesionflow.data.deid.load_key(workdir)")
            pseudonyms = Pseudonyms(key)
            root = _pseudonymized_view(cfg, root, Path(view).resolve(), pseudonyms)
            display_root += " (pseudonymized)"
        problems = _Problems(cfg.on_error, root, display_root)
        try:
            items, known = _plan(cfg, root, problems)
            rows = _read_metadata(cfg, root, display_root)
            items = _join_metadata(items, known, rows, cfg, display_root, problems)
        except IngestError as err:
            raise problems.rewrite(err) from None

        _check_out_dir(out_dir)
        with staged_dataset(out_dir) as tmp:
            converted = _convert_all(items, tmp, cfg, problems, pseudonyms)
            if not converted:
                raise EmptySourceError(f"every file of ingest source {display_root} was skipped: "
                                       + "; ".join(s["reason"] for s in problems.skipped[:3]))
            records, merged = _build_records(converted, cfg)
            records = [_into_video_folder(r, tmp) if r.kind == "video_frame" else r for r in records]
            report = IngestReport(
                n_records=len(records),
                counts={
                    "split": dict(sorted(Counter(r.split for r in records).items())),
                    "kind": dict(sorted(Counter(r.kind for r in records).items())),
                    "lesion_type": dict(sorted(Counter(r.lesion_type for r in records).items())),
                },
                skipped=sorted(problems.skipped, key=lambda s: (s["path"], s["reason"])),
                merged_groups=merged,
            )
            write_index(tmp, records)
            _write_headers(tmp, converted)
            (tmp / REPORT).write_text(json.dumps(report.model_dump(), indent=2, sort_keys=True) + "\n")
    return report
