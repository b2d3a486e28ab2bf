"""Deterministic synthetic lesions, so the default pipeline runs on a machine with no data.

The output is a *source folder* in the same generic layout users bring (``images/``, ``masks/``,
``metadata.csv``), so synthetic data goes through the real ingestion path, not a side door.
Stills hold one lesion each on a smooth textured background; videos hold one lesion that drifts
and breathes across frames under slight camera jitter, with frame 0 marked as the key frame.
Everything here is clearly synthetic (lesion types ``round`` / ``elongated``), never a stand-in
for clinical data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from lesionflow.config import SyntheticConfig

METADATA_CSV = "metadata.csv"
COLUMNS = {"id": "id", "lesion_type": "lesion_type", "group": "group", "frame": "frame",
           "key_frame": "key_frame", "area_ratio": "area_ratio", "area_error": "area_error"}
WEAK_ERROR = 0.02  # the area_error of weak stills; their ratio is off by up to half of it


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0.25, 0.55, size=3)
    noise = gaussian_filter(rng.normal(0, 1, (size, size, 3)), sigma=(size / 12, size / 12, 0))
    noise /= np.abs(noise).max() + 1e-8
    fine = rng.normal(0, 0.03, (size, size, 3))
    return base + 0.15 * noise + fine


def _lesion_mask(size: int, cy: float, cx: float, ry: float, rx: float, angle: float,
                 wobble: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    theta = np.arctan2(v, u)
    # a few low-frequency harmonics make the outline irregular, as real lesions are
    radius_scale = 1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(wobble))
    return (u / rx) ** 2 + (v / ry) ** 2 <= radius_scale**2


def _render(rng: np.random.Generator, background: np.ndarray, mask: np.ndarray,
            tint: np.ndarray) -> np.ndarray:
    soft = gaussian_filter(mask.astype(np.float64), 1.5)[..., None]
    texture = gaussian_filter(rng.normal(0, 1, mask.shape), 2)[..., None] * 0.05
    image = background * (1 - soft) + (tint + texture) * soft
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _shape(rng: np.random.Generator, size: int, lesion_type: str) -> dict:
    r = rng.uniform(0.08, 0.2) * size
    aspect = 1.0 if lesion_type == "round" else rng.uniform(1.8, 2.6)
    return dict(
        cy=rng.uniform(0.3, 0.7) * size, cx=rng.uniform(0.3, 0.7) * size,
        ry=r, rx=r * aspect, angle=rng.uniform(0, np.pi),
        wobble=np.stack([rng.uniform(0, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
    )


def make_synthetic_source(cfg: SyntheticConfig, root: Path) -> Path:
    """Write ``cfg.n_images`` stills, ``cfg.n_videos`` videos and ``cfg.n_weak`` weak stills (an
    area ratio in the metadata, no mask), drawn from ``cfg.seed``, under ``root``; return ``root``."""
    rng = np.random.default_rng(cfg.seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    size = cfg.size

    def save(record_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        Image.fromarray(image).save(root / "images" / f"{record_id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{record_id}.png")

    for i in range(cfg.n_images):
        lesion_type = cfg.lesion_types[i % len(cfg.lesion_types)]
        shape = _shape(rng, size, lesion_type)
        mask = _lesion_mask(size, **shape)
        tint = rng.uniform(0.55, 0.85, 3)
        record_id = f"still_{i:04d}"
        save(record_id, _render(rng, _background(rng, size), mask, tint), mask)
        rows.append(dict(id=record_id, lesion_type=lesion_type, group=f"patient_{i:04d}",
                         frame="", key_frame=""))

    for v in range(cfg.n_videos):
        lesion_type = cfg.lesion_types[v % len(cfg.lesion_types)]
        shape = _shape(rng, size, lesion_type)
        tint = rng.uniform(0.55, 0.85, 3)
        background = _background(rng, size + 16)
        velocity = rng.uniform(-1.5, 1.5, 2)
        for t in range(cfg.frames_per_video):
            breath = 1 + 0.06 * np.sin(2 * np.pi * t / 6)  # ultrasound-like periodic scaling
            jitter = rng.integers(0, 5, 2)  # camera shake: crop the background at an offset
            frame_shape = dict(shape, cy=shape["cy"] + velocity[0] * t,
                               cx=shape["cx"] + velocity[1] * t,
                               ry=shape["ry"] * breath, rx=shape["rx"] * breath)
            mask = _lesion_mask(size, **frame_shape)
            crop = background[jitter[0]:jitter[0] + size, jitter[1]:jitter[1] + size]
            record_id = f"video_{v:02d}_f{t:03d}"
            save(record_id, _render(rng, crop, mask, tint), mask)
            rows.append(dict(id=record_id, lesion_type=lesion_type, group=f"video_{v:02d}",
                             frame=t, key_frame=int(t == 0)))

    for i in range(cfg.n_weak):  # after the videos, so adding them leaves the other records as they were
        lesion_type = cfg.lesion_types[i % len(cfg.lesion_types)]
        mask = _lesion_mask(size, **_shape(rng, size, lesion_type))
        record_id = f"weak_{i:04d}"
        image = _render(rng, _background(rng, size), mask, rng.uniform(0.55, 0.85, 3))
        Image.fromarray(image).save(root / "images" / f"{record_id}.png")
        ratio = np.clip(mask.mean() + rng.uniform(-WEAK_ERROR / 2, WEAK_ERROR / 2), 0, 1)
        rows.append({"id": record_id, "lesion_type": lesion_type, "group": f"weak_patient_{i:04d}",
                     "area_ratio": f"{ratio:.5f}", "area_error": WEAK_ERROR})

    with open(root / METADATA_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return root
