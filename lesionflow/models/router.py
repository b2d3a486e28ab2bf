"""One model per lesion type behind one registered model (seed 003).

Registering a router rather than one model per type keeps a single ``champion`` alias, gate and
rollback for the whole set: the per-type models are always promoted and rolled back together,
so a deployment never mixes versions trained on different data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from lesionflow.errors import LesionflowError
from lesionflow.models.segmenter import Segmenter


class UnknownLesionTypeError(LesionflowError):
    """An image's lesion type has no model in the router."""


class Routing:
    """Routing by lesion type over ``self.models`` (type → a model with ``predict_proba``), shared
    by ``LesionTypeRouter`` and its ONNX Runtime twin (``models/runtime.py``), so both refuse and
    route alike."""

    models: Mapping[str, Any]

    @property
    def lesion_types(self) -> list[str]:
        return sorted(self.models)

    def route(self, lesion_type: str | None):
        if lesion_type not in self.models:
            raise UnknownLesionTypeError(
                f"no model for lesion type {lesion_type!r}; this model knows {self.lesion_types}")
        return self.models[lesion_type]

    def predict_proba(self, images: list[np.ndarray], lesion_types: list[str | None] | None = None,
                      batch_size: int = 8) -> list[np.ndarray]:
        """Each image goes to its lesion type's model; a type the router lacks is an error."""
        if lesion_types is None or len(lesion_types) != len(images):
            raise UnknownLesionTypeError("a per-lesion-type model needs one lesion type per image")
        out: list[np.ndarray | None] = [None] * len(images)
        for lesion_type in sorted(set(lesion_types), key=str):
            index = [i for i, t in enumerate(lesion_types) if t == lesion_type]
            probs = self.route(lesion_type).predict_proba([images[i] for i in index], batch_size=batch_size)
            for i, p in zip(index, probs, strict=True):
                out[i] = p
        return out


class LesionTypeRouter(Routing, nn.Module):
    def __init__(self, models: dict[str, Segmenter]):
        super().__init__()
        if not models:
            raise ValueError("a router needs at least one per-type model")
        self.models = nn.ModuleDict(models)
