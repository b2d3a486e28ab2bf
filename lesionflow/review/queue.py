"""``lesionflow review next``: the next batch for reviewers, with the model's masks to correct.

Candidates come from a canonical dataset's records without a mask (``--from unlabelled``:
unlabelled stills and unmasked video frames; weak records have a label already) or from the
prediction log's answers whose image was kept (``--from predictions``). Exact duplicates (same
content hash) are kept once. The model — the champion, or ``--model`` — looks at each under
test-time augmentation (``lesionflow/uncertainty.py``); a strategy (``strategies.py``) ranks and
picks; the batch folder gets the picked images and the model's own masks (``segment``, what the
server answers) as pre-annotations::

    batch.json         {"strategy", "model_version", "created", "items": [{"id",
                        "image": "images/<id>.png", "prediction": "predictions/<id>.png",
                        "lesion_type", "score", "source"}]}  (items in pick order)
    images/<id>.png    the image (8-bit, as the model saw it)
    predictions/<id>.png   the model's mask, 0 / 255

The batch is also an MLflow run (step ``review``): the strategy as a param, the whole ranked pool
(``review/ranked.json``), ``batch.json`` and a strip of the top picks with their masks
(``review/top_candidates.png``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

import mlflow
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from lesionflow import lineage, registry
from lesionflow.config import Params
from lesionflow.data.manifest import read_manifest
from lesionflow.data.transforms import load_image
from lesionflow.errors import ReviewError
from lesionflow.models.pyfunc import SegmentationModel, encode_png
from lesionflow.models.router import UnknownLesionTypeError
from lesionflow.progress import progress
from lesionflow.review import log as prediction_log
from lesionflow.review.strategies import Candidate, difference_hash, make
from lesionflow.uncertainty import measure

BATCH = "batch.json"
RANKED_ARTIFACT = "review/ranked.json"
STRIP_ARTIFACT = "review/top_candidates.png"
STRIP_PANELS = 8  # candidates shown in the strip
PANEL = 256  # px, side of each panel
Source = Literal["unlabelled", "predictions"]


@dataclass
class PoolItem:
    """An image that could be reviewed, before the model has looked at it."""

    id: str
    source: str
    lesion_type: str | None
    group: str | None
    sha256: str
    load: Callable[[], np.ndarray]


@dataclass
class BatchReport:
    out: Path
    strategy: str
    model_version: str
    items: list[dict]
    n_candidates: int
    run_id: str
    skipped: dict[str, int] = field(default_factory=dict)  # why candidates were left out

    def summary(self) -> str:
        skipped = "".join(f"; {n} {why}" for why, n in self.skipped.items() if n)
        return (f"{self.out}: {len(self.items)} of {self.n_candidates} candidates for review "
                f"({self.strategy}, model v{self.model_version}{skipped}); MLflow run {self.run_id}")


def _safe_id(record_id: str) -> str:
    parts = PurePosixPath(record_id).parts
    if not parts or PurePosixPath(record_id).is_absolute() or ".." in parts:
        raise ReviewError(f"record id {record_id!r} would leave the batch folder")
    return record_id


def unlabelled_pool(dataset_dir: Path) -> list[PoolItem]:
    """Records without a pixel mask (weak records have a label of their own)."""
    dataset_dir = Path(dataset_dir)
    return [PoolItem(_safe_id(r.id), f"dataset:{r.id}", r.lesion_type, r.group, r.image_sha256,
                     lambda r=r: load_image(dataset_dir, r))
            for r in read_manifest(dataset_dir) if r.mask is None and r.kind != "weak"]


def prediction_pool(params: Params) -> tuple[list[PoolItem], int]:
    """(answers whose image was kept, newest per image; count of answers without one)."""
    folder = prediction_log.log_dir(params)
    store = prediction_log.ImageStore.for_config(params.serve, folder, params.runtime.s3_endpoint_url)
    latest: dict[str, prediction_log.LogRecord] = {}
    without = 0
    for record in prediction_log.read_log(folder):
        if record.image is None:
            without += 1
        else:
            latest[record.image_sha256] = record

    def loader(ref: str) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(Image.open(io.BytesIO(store.get(ref))))

    return [PoolItem(f"p-{sha[:16]}", f"prediction:{r.request_id}", r.lesion_type, None, sha, loader(r.image))
            for sha, r in latest.items()], without


def _unique(pool: list[PoolItem]) -> Iterator[PoolItem]:
    seen: set[str] = set()
    for item in pool:
        if item.sha256 not in seen:
            seen.add(item.sha256)
            yield item


def score_pool(model: SegmentationModel, pool: list[PoolItem]) -> tuple[list[Candidate], int]:
    """(candidates with their TTA uncertainty, count of items whose lesion type the model has no
    model for — a per-type model cannot judge those)."""
    candidates, unknown = [], 0
    for item in progress(list(_unique(pool)), "review: TTA"):
        image = item.load()
        try:
            uncertainty = measure(model.predictor, image, model.threshold, item.lesion_type)
        except UnknownLesionTypeError:
            unknown += 1
            continue
        candidates.append(Candidate(item.id, item.source, item.lesion_type, item.group, item.sha256,
                                    difference_hash(image), uncertainty, item.load))
    return candidates, unknown


def next_batch(params: Params, out: Path, *, source: Source = "unlabelled", dataset: Path | None = None,
               n: int | None = None, strategy: str | None = None, model: str = "champion") -> BatchReport:
    """Rank the pool with ``strategy`` (default ``review.strategy``), write the best ``n`` (default
    ``review.batch_size``) to ``out`` and log the batch as an MLflow run (call after
    ``tracking.connect``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReviewError(f"output folder {out} exists and is not empty; name a new one")
    n = params.review.batch_size if n is None else n
    if n < 1:
        raise ReviewError(f"a batch needs at least one image, not {n}")
    chooser = make(strategy or params.review.strategy, params)
    name = params.runtime.model_name
    version = registry.resolve(name, model)
    segmenter = registry.load_pyfunc(name, version)

    skipped: dict[str, int] = {}
    if source == "unlabelled":
        if dataset is None:
            raise ReviewError("--from unlabelled needs --dataset: a canonical dataset folder")
        pool = unlabelled_pool(dataset)
        where = f"{dataset} has no records without a mask"
    else:
        pool, skipped["answers without a kept image"] = prediction_pool(params)
        where = (f"the prediction log at {prediction_log.log_dir(params)} holds no kept image: serve "
                 "with serve.keep_images: true")
    candidates, skipped[f"of a lesion type v{version} has no model for"] = score_pool(segmenter, pool)
    if not candidates:
        left_out = "; ".join(f"{n} {why}" for why, n in skipped.items() if n)
        raise ReviewError(f"nothing to review: {where}" + (f" (left out: {left_out})" if left_out else ""))

    scores = chooser.rank(candidates)
    picked = chooser.select(candidates, scores, n)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    items, panels = [], []
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=_parent(out)))
    try:
        for i in picked:
            c = candidates[i]
            image = c.load()
            mask = segmenter.segment(image, c.lesion_type).mask
            item = {"id": c.id, "image": f"images/{c.id}.png", "prediction": f"predictions/{c.id}.png",
                    "lesion_type": c.lesion_type, "score": float(scores[i]), "source": c.source}
            for rel, data in ((item["image"], prediction_log.png_bytes(image)), (item["prediction"], encode_png(mask))):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            items.append(item)
            if len(panels) < STRIP_PANELS:
                panels.append((image, mask, item))
        batch = {"strategy": chooser.name, "model_version": version, "created": created, "items": items}
        (tmp / BATCH).write_text(json.dumps(batch, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    ranked = _ranked(candidates, scores, picked)
    with mlflow.start_run(run_name=f"review next ({chooser.name})", tags={lineage.TAG_STEP: "review"}) as run:
        mlflow.log_params({"strategy": chooser.name, "n": n, "from": source, "model": f"{name}@{version}",
                           **chooser.settings()})
        mlflow.log_metrics({"n_candidates": len(candidates), "n_picked": len(items),
                            "mean_score_picked": float(np.mean([it["score"] for it in items])),
                            "mean_score_pool": float(np.mean(scores))})
        mlflow.log_dict(ranked, RANKED_ARTIFACT)
        mlflow.log_dict(batch, f"review/{BATCH}")
        mlflow.log_image(strip(panels), STRIP_ARTIFACT)
    return BatchReport(out, chooser.name, version, items, len(candidates), run.info.run_id, skipped)


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _ranked(candidates: list[Candidate], scores: np.ndarray, picked: list[int]) -> list[dict]:
    """The whole pool: the picks in pick order, then the rest by score."""
    chosen = set(picked)
    rest = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in chosen]
    return [{"rank": rank, "id": c.id, "source": c.source, "lesion_type": c.lesion_type, "group": c.group,
             "score": float(scores[i]), "picked": rank <= len(picked),
             "tta_agreement": c.uncertainty.tta_agreement, "entropy": c.uncertainty.entropy,
             "ambiguous_area": c.uncertainty.ambiguous_area}
            for rank, i in enumerate(picked + rest, 1) for c in [candidates[i]]]


# --- the strip ---------------------------------------------------------------------------------


def _fit(image: np.ndarray, resample: int) -> Image.Image:
    """``image`` scaled to fit a PANEL x PANEL square, centred on black."""
    pil = Image.fromarray(image)
    scale = PANEL / max(pil.size)
    pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), resample)
    canvas = Image.new(pil.mode, (PANEL, PANEL))
    canvas.paste(pil, ((PANEL - pil.width) // 2, (PANEL - pil.height) // 2))
    return canvas


def strip(panels: list[tuple[np.ndarray, np.ndarray, dict]]) -> Image.Image:
    """One column per candidate: a label (rank, score, lesion type, id), the image, and the image
    with the predicted mask (red fill, yellow outline); PANEL-pixel panels."""
    font = ImageFont.load_default(size=18)
    band = 52
    sheet = Image.new("RGB", (PANEL * max(1, len(panels)), band + 2 * PANEL), "white")
    draw = ImageDraw.Draw(sheet)
    for col, (image, mask, item) in enumerate(panels):
        x = col * PANEL
        rgb = np.asarray(_fit(image, Image.BILINEAR).convert("RGB"))
        m = np.asarray(_fit(mask.astype(np.uint8) * 255, Image.NEAREST)) > 0
        overlay = rgb.astype(float)
        overlay[m] = 0.6 * overlay[m] + 0.4 * np.array([255, 0, 0])
        overlay[m & ~binary_erosion(m, iterations=2)] = (255, 255, 0)
        sheet.paste(Image.fromarray(rgb), (x, band))
        sheet.paste(Image.fromarray(overlay.astype(np.uint8)), (x, band + PANEL))
        draw.text((x + 6, 4), f"#{col + 1}  score {item['score']:.3f}", fill="black", font=font)
        draw.text((x + 6, 27), f"{item['lesion_type'] or '-'}  {item['id']}"[:26], fill="black", font=font)
        draw.line([(x, 0), (x, sheet.height)], fill="grey")
    return sheet
