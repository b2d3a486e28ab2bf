"""Training augmentation for (image, target) pairs already at the model's size.

``flips``: the 8 flips/quarter turns and a mild gain/offset — geometry-safe for any lesion type.
``strong``: also scale/shift/rotate, colour jitter and blur through albumentations; a from-scratch
model on a thousand images overfits without them.

Targets are int8 with -1 for ignored pixels; geometric transforms carry them with nearest
interpolation, and pixels shifted in from outside the image become background (the image is
black there too).

Random streams: each DataLoader worker must draw its own numbers. A generator created in
``__init__`` is copied into every worker and, because workers are re-created each epoch, replays
the same draws every epoch; ``reseed`` is called per worker with the seed torch gives it (different
per worker and per epoch, reproducible from the loader's generator).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Strength = Literal["none", "flips", "strong"]


class Augmenter:
    def __init__(self, strength: Strength, seed: int):
        self.strength = strength
        self.pipeline = _strong_pipeline() if strength == "strong" else None
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        if self.pipeline is not None:
            self.pipeline.set_random_seed(int(self.rng.integers(2**31)))

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, S, S) uint8 image and (1, S, S) int8 target → float32 arrays, augmented."""
        if self.strength == "none":
            return image.astype(np.float32), target.astype(np.float32)
        if self.pipeline is not None:
            out = self.pipeline(image=image.transpose(1, 2, 0), mask=(target[0] + 1).astype(np.uint8))
            image, target = out["image"].transpose(2, 0, 1), out["mask"][None].astype(np.int8) - 1
        k = int(self.rng.integers(4))
        image, target = np.rot90(image, k, (1, 2)), np.rot90(target, k, (1, 2))
        if self.rng.random() < 0.5:
            image, target = image[:, :, ::-1], target[:, :, ::-1]
        gain, offset = self.rng.uniform(0.9, 1.1), self.rng.uniform(-10, 10)
        image = np.clip(image.astype(np.float32) * gain + offset, 0, 255)
        return np.ascontiguousarray(image), np.ascontiguousarray(target, dtype=np.float32)


def _strong_pipeline():
    import albumentations as A  # imported only where strong augmentation is asked for
    import cv2

    # mask values are target + 1 here: 0 ignore, 1 background, 2 lesion
    return A.Compose([
        A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-30, 30),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=1, p=0.7),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.7),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=0.2),
    ])
