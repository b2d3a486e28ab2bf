"""Review strategies: which candidates reviewers should label first, found by name (MONAI Label's
active-learning strategies are the model).

A strategy is a small class with ``rank(candidates) -> scores`` (higher: review sooner) and
``select(candidates, scores, n)`` (default: the ``n`` best). Built in:

- ``random``: a seeded shuffle — the baseline an uncertainty strategy has to beat.
- ``entropy``: predictive entropy of the mean TTA probability map (bits per pixel).
- ``tta``: disagreement under test-time augmentation, 1 - mean Dice of the 8 views' masks with
  their consensus.
- ``diversity-weighted``: the three uncertainties (TTA disagreement, entropy, ambiguous lesion
  area) as percentile ranks in the pool, averaged; then picked greedily, each pick scaling the
  score of every candidate from the same video/sequence (or patient) — and of every near-duplicate
  image — by ``1 - review.diversity_weight``, so one video cannot fill the batch.

Add one with ``@register`` on a ``Strategy`` subclass with a new ``name``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy.stats import rankdata

from lesionflow.config import Params
from lesionflow.errors import ReviewError
from lesionflow.uncertainty import Uncertainty

NEAR_DUPLICATE_BITS = 6  # difference hashes this close (of 64 bits): the same view, re-sent or a frame apart


@dataclass
class Candidate:
    """An image reviewers could label, with what the model's TTA pass said about it."""

    id: str
    source: str  # dataset:<record id> | prediction:<request id>
    lesion_type: str | None
    group: str | None  # video/sequence (or patient) id; None: unknown (prediction log)
    sha256: str  # exact content: duplicates are dropped before ranking
    dhash: int  # 64-bit difference hash: near-duplicates differ in a few bits
    uncertainty: Uncertainty
    load: Callable[[], np.ndarray]  # the pixels, read again only for the images picked


def difference_hash(image: np.ndarray) -> int:
    """64-bit dHash: brighter-than-right-neighbour bits of a 9x8 grey thumbnail. Robust to
    re-encoding, scaling and small shifts, unlike a hash of the bytes."""
    gray = Image.fromarray(image).convert("L").resize((9, 8), Image.BILINEAR)
    pixels = np.asarray(gray, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


class Strategy:
    name: ClassVar[str]

    @classmethod
    def from_params(cls, params: Params) -> Strategy:
        return cls()

    def settings(self) -> dict:
        """What the strategy was configured with (logged as MLflow params next to its name)."""
        return {}

    def rank(self, candidates: list[Candidate]) -> np.ndarray:
        raise NotImplementedError

    def select(self, candidates: list[Candidate], scores: np.ndarray, n: int) -> list[int]:
        """Indices of the ``n`` highest scores, best first (ties: candidate order)."""
        return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def make(name: str, params: Params) -> Strategy:
    if name not in STRATEGIES:
        raise ReviewError(f"no review strategy named {name!r}; registered: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name].from_params(params)


@register
class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    @classmethod
    def from_params(cls, params: Params) -> Strategy:
        return cls(params.seed)

    def settings(self) -> dict:
        return {"seed": self.seed}

    def rank(self, candidates: list[Candidate]) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(candidates))


@register
class EntropyStrategy(Strategy):
    name = "entropy"

    def rank(self, candidates: list[Candidate]) -> np.ndarray:
        return np.array([c.uncertainty.entropy for c in candidates], dtype=float)


@register
class TTAStrategy(Strategy):
    name = "tta"

    def rank(self, candidates: list[Candidate]) -> np.ndarray:
        return np.array([1.0 - c.uncertainty.tta_agreement for c in candidates], dtype=float)


@register
class DiversityWeightedStrategy(Strategy):
    name = "diversity-weighted"

    def __init__(self, weight: float = 0.7):
        self.weight = weight

    @classmethod
    def from_params(cls, params: Params) -> Strategy:
        return cls(params.review.diversity_weight)

    def settings(self) -> dict:
        return {"diversity_weight": self.weight}

    def rank(self, candidates: list[Candidate]) -> np.ndarray:
        """Mean percentile rank of TTA disagreement, entropy and ambiguous area: three scales
        with nothing in common become comparable, and no single one dominates."""
        if not candidates:
            return np.zeros(0)
        u = [c.uncertainty for c in candidates]
        measures = ([1.0 - x.tta_agreement for x in u], [x.entropy for x in u], [x.ambiguous_area for x in u])
        return np.mean([rankdata(m) / len(candidates) for m in measures], axis=0)

    def select(self, candidates: list[Candidate], scores: np.ndarray, n: int) -> list[int]:
        """Greedy: each round takes the best score after the penalty (1 - weight) ** k, k = picks
        already made from the candidate's group plus picks that are near-duplicates of it."""
        hashes = np.array([c.dhash for c in candidates], dtype=np.uint64)
        near = np.zeros(len(candidates), dtype=int)
        per_group: Counter[str] = Counter()
        remaining, picked = set(range(len(candidates))), []
        while remaining and len(picked) < n:
            def key(i: int) -> tuple[float, float, int]:
                group = candidates[i].group
                k = near[i] + (per_group[group] if group is not None else 0)
                return scores[i] * (1.0 - self.weight) ** k, scores[i], -i
            best = max(remaining, key=key)
            picked.append(best)
            remaining.discard(best)
            if candidates[best].group is not None:
                per_group[candidates[best].group] += 1
            near += np.bitwise_count(hashes ^ hashes[best]) <= NEAR_DUPLICATE_BITS
        return picked
