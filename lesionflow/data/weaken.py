"""Fully labelled dataset → area-ratio weak records, to measure weak supervision against full.

Each chosen record (a labelled record of the chosen splits) loses its mask and becomes ``weak``
with ``area_ratio`` = its true lesion fraction at canonical resolution, optionally perturbed by
uniform noise of at most ``noise`` (a clinician's size estimate is not exact) and with
``area_error`` recorded as ``error`` (default: ``noise``, the honest bound). Everything else is
hard-linked unchanged, so val/test keep their ground truth.

    weaken("data/kvasir", "data/kvasir-weak", noise=0.05)   # every train mask → r ± 0.05
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import (
    Record,
    check_fresh,
    link_or_copy,
    read_manifest,
    staged_dataset,
)
from lesionflow.data.transforms import load_mask
from lesionflow.errors import WeakLabelError

SPLITS = ("train", "val", "test")


def weaken(dataset_dir: str | Path, out_dir: str | Path, *, splits: Sequence[str] = ("train",),
           fraction: float = 1.0, noise: float = 0.0, error: float | None = None,
           seed: int = 0) -> list[Record]:
    """Write a copy of ``dataset_dir`` to ``out_dir`` in which ``fraction`` of the labelled
    records of ``splits`` (chosen with ``seed``) are weak; return the new records."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise WeakLabelError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")
    for name, value in (("fraction", fraction), ("noise", noise), ("error", error)):
        if value is not None and not 0 <= value <= 1:
            raise WeakLabelError(f"{name} must lie in [0, 1], got {value}")
    dataset_dir = Path(dataset_dir)
    records = read_manifest(dataset_dir)
    rng = np.random.default_rng(seed)
    candidates = sorted(r.id for r in records if r.split in splits and r.mask is not None)
    chosen = set(rng.choice(candidates, size=round(fraction * len(candidates)), replace=False).tolist()
                 if candidates else [])
    out: list[Record] = []
    try:
        check_fresh(Path(out_dir))
    except FileExistsError as err:
        raise WeakLabelError(str(err)) from None
    with staged_dataset(Path(out_dir)) as tmp:
        for record in records:
            link_or_copy(dataset_dir / record.image, tmp / record.image)
            if record.id not in chosen:
                if record.mask is not None:
                    link_or_copy(dataset_dir / record.mask, tmp / record.mask)
                out.append(record)
                continue
            ratio = float(load_mask(dataset_dir, record).mean())
            if noise:
                ratio = float(np.clip(ratio + rng.uniform(-noise, noise), 0.0, 1.0))
            out.append(record.model_copy(update={
                "kind": "weak", "mask": None, "mask_sha256": None, "area_ratio": round(ratio, 6),
                "area_error": noise if error is None else error}))
        write_index(tmp, out)
    return out
