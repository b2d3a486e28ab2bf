"""Dataset fingerprint (in the spirit of nnU-Net): the statistics later steps need to choose
image size and intensity normalisation, and that reviewers need to see what changed between two
dataset versions. Deterministic (records are visited in id order, floats rounded) so it never
changes a DVC hash by itself.

Schema::

    n_records
    counts        {kind: {...}, lesion_type: {...}, split: {...}}
    channels      {"1": n, "3": n}
    size          {height: {min, median, max}, width: {min, median, max}}
    intensity     {channels, mean: [per channel], std: [per channel]}   0-255 scale; grayscale
                  images count towards every channel when the dataset also holds RGB
    lesion_area   {overall: AreaStats, per_lesion_type: {type: AreaStats}}
                  AreaStats = {n_masks, empty_fraction, quantiles: {"0", "25", "50", "75", "100"}}
                  (fraction of pixels that are lesion, over records that have a mask)
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from lesionflow.data.manifest import FINGERPRINT, IGNORE_VALUE, Record, write_manifest

QUANTILES = (0, 25, 50, 75, 100)


def _r(x: float) -> float:
    return round(float(x), 6)


def _counts(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _stats(values: list[int]) -> dict:
    return {"min": int(min(values)), "median": _r(np.median(values)), "max": int(max(values))}


def _area_stats(ratios: list[float]) -> dict:
    if not ratios:
        return {"n_masks": 0, "empty_fraction": None, "quantiles": None}
    arr = np.asarray(ratios)
    return {
        "n_masks": len(ratios),
        "empty_fraction": _r((arr == 0).mean()),
        "quantiles": {str(q): _r(np.percentile(arr, q)) for q in QUANTILES},
    }


def _pixel_sums(dataset_dir: Path, record: Record, channels: int
                ) -> tuple[np.ndarray, np.ndarray, int, float | None]:
    """(per-channel sum, per-channel sum of squares, pixel count, lesion area ratio or None)."""
    with Image.open(dataset_dir / record.image) as img:
        image = np.asarray(img, dtype=np.float64)
    if image.ndim == 2:
        image = np.repeat(image[..., None], channels, axis=2)
    flat = image.reshape(-1, channels)
    area = None
    if record.mask is not None:
        with Image.open(dataset_dir / record.mask) as m:
            mask = np.asarray(m)
            area = float(((mask > 0) & (mask != IGNORE_VALUE)).mean())  # ignore is not lesion
    return flat.sum(axis=0), (flat**2).sum(axis=0), flat.shape[0], area


def write_index(dataset_dir: Path, records: list[Record]) -> None:
    """Write the manifest and its fingerprint: the two files that make a folder a dataset."""
    write_manifest(dataset_dir, records)
    fingerprint = compute_fingerprint(records, dataset_dir)
    (dataset_dir / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def compute_fingerprint(records: list[Record], dataset_dir: Path) -> dict:
    """Statistics of the written dataset (reads ``images/`` and ``masks/`` back from disk)."""
    dataset_dir = Path(dataset_dir)
    records = sorted(records, key=lambda r: r.id)
    if not records:
        raise ValueError("cannot fingerprint an empty dataset")
    channels = max(r.channels for r in records)
    with ThreadPoolExecutor() as pool:
        sums = list(pool.map(lambda r: _pixel_sums(dataset_dir, r, channels), records))
    total = np.sum([s[0] for s in sums], axis=0)
    total_sq = np.sum([s[1] for s in sums], axis=0)
    n_pixels = sum(s[2] for s in sums)
    mean = total / n_pixels
    std = np.sqrt(np.maximum(total_sq / n_pixels - mean**2, 0.0))

    areas: dict[str, list[float]] = {}
    for record, (_, _, _, area) in zip(records, sums):
        if area is not None:
            areas.setdefault(record.lesion_type, []).append(area)
    return {
        "n_records": len(records),
        "counts": {
            "kind": _counts(r.kind for r in records),
            "lesion_type": _counts(r.lesion_type for r in records),
            "split": _counts(r.split for r in records),
        },
        "channels": {str(k): v for k, v in _counts(r.channels for r in records).items()},
        "size": {
            "height": _stats([r.height for r in records]),
            "width": _stats([r.width for r in records]),
        },
        "intensity": {
            "channels": channels,
            "mean": [_r(m) for m in mean],
            "std": [_r(s) for s in std],
        },
        "lesion_area": {
            "overall": _area_stats([a for t in sorted(areas) for a in areas[t]]),
            "per_lesion_type": {t: _area_stats(areas[t]) for t in sorted(areas)},
        },
    }
