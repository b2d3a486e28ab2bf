"""Image/mask loading and the resize/channel conventions shared by training and inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lesionflow.data.manifest import IGNORE_VALUE, Record


def load_image(dataset_dir: Path, record: Record) -> np.ndarray:
    return np.asarray(Image.open(Path(dataset_dir) / record.image))


def load_mask(dataset_dir: Path, record: Record) -> np.ndarray:
    """Boolean HxW lesion pixels (ignore pixels are not lesion); a record without a mask
    (unlabelled/weak) has none to load."""
    mask = _read_mask(dataset_dir, record)
    return (mask > 0) & (mask != IGNORE_VALUE)


def load_target(dataset_dir: Path, record: Record, size: int) -> np.ndarray:
    """int8 SxS training target: 1 lesion, 0 background, -1 ignore (``IGNORE_VALUE`` pixels)."""
    mask = np.asarray(Image.fromarray(_read_mask(dataset_dir, record)).resize((size, size), Image.NEAREST))
    return np.where(mask == IGNORE_VALUE, -1, mask > 0).astype(np.int8)


def _read_mask(dataset_dir: Path, record: Record) -> np.ndarray:
    if record.mask is None:
        raise ValueError(f"record {record.id} ({record.kind}) has no mask")
    return np.asarray(Image.open(Path(dataset_dir) / record.mask))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWxC uint8 → HxWx``channels`` (gray is repeated, RGB averaged to gray)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == channels:
        return image
    if channels == 1:
        return image.mean(axis=2, keepdims=True).astype(np.uint8)
    if image.shape[2] == 1:
        return np.repeat(image, channels, axis=2)
    raise ValueError(f"cannot map {image.shape[2]} image channels to {channels} model channels")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize (aspect not kept: lesions stay whole, metrics are taken at native size)."""
    squeeze = image.ndim == 3 and image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return out[..., None] if squeeze else out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Boolean HxW → boolean SxS (nearest: no invented boundary values)."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(pil.resize((size, size), Image.NEAREST)) > 0


def resize_prob(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """Probability map back to the image's own size, so metrics are measured there."""
    return np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize(
        (width, height), Image.BILINEAR))
