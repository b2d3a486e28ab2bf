"""Pseudo-label step: the champion labels the unlabelled training images and scores every
model-made training mask; a threshold (or quantile) splits those into good and bad task data.
Masks people drew (ground truth, reviewer corrections: ``TRUSTED_KINDS``) are never scored and
always good: "bad" means a model's mask that scored below the cut.

The output is a new canonical dataset (same manifest schema; images hard-linked, not copied):
unlabelled train records become ``pseudo_label`` records with the predicted mask, every model-made
train mask gets ``score`` / ``score_method`` / ``quality``; val and test stay untouched so evaluation
is always against ground truth. With no champion yet the labelled records pass through as good
task data and the unlabelled ones stay unlabelled: the first model learns from labels only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import (
    TRUSTED_KINDS,
    Record,
    link_or_copy,
    read_manifest,
    staged_dataset,
    write_png,
)
from lesionflow.data.transforms import load_image, load_mask
from lesionflow.metrics import dice
from lesionflow.models.router import UnknownLesionTypeError
from lesionflow.progress import progress
from lesionflow.pseudo import predict_with_tta, quality_cutoff, score
from lesionflow.weak.step import label_weak_records

REPORT = "pseudo_label_report.json"


@dataclass
class PseudoLabelReport:
    labeller: str | None  # "NAME@version", or None when there was no champion
    message: str
    weak_model: str | None = None  # runs:/<id>/weak_model when area-ratio records were labelled
    cutoff: float | None = None
    counts: dict[str, int] = field(default_factory=dict)  # good / bad / pseudo_labelled / hidden
    hidden_mask_dice: float | None = None  # experiments only: pseudo-labels vs the hidden truth


def hidden_ids(records: list[Record], fraction: float, seed: int) -> set[str]:
    """Deterministically pick ``fraction`` of the labelled train records whose masks are hidden
    (experiments that measure learning from pseudo-labels against full supervision)."""
    # only true labels are hidden: synthetic videos and propagated masks have no truth behind them
    candidates = sorted(r.id for r in records if r.split == "train" and r.mask is not None
                        and r.kind not in ("synthetic_video", "pseudo_label"))
    rng = np.random.default_rng(seed)
    return set(rng.choice(candidates, size=int(round(fraction * len(candidates))), replace=False))


def _labeller(params: Params):
    """(model, "NAME@version") for the configured alias/version, or (None, None) if no champion."""
    name, ref = params.runtime.model_name, params.pseudo_label.model
    # resolve the alias once, so the model loaded and the version recorded can't disagree
    version = registry.champion_version(name) if ref == "champion" else ref
    if version is None:
        return None, None
    return registry.load_model(name, version), f"{name}@{version}"


def pseudo_label(params: Params, dataset_dir: Path, out_dir: Path) -> PseudoLabelReport:
    cfg = params.pseudo_label
    records = read_manifest(dataset_dir)
    hidden = hidden_ids(records, cfg.hide_masks_fraction, params.seed)
    model, labeller = _labeller(params)
    if model is None:
        report = PseudoLabelReport(None, f"no champion of {params.runtime.model_name} yet: training "
                                         "on labelled data only; unlabelled images stay unlabelled")
    else:
        report = PseudoLabelReport(labeller, f"labelled by {labeller} ({cfg.scorer} scorer)")
    print(report.message)

    with staged_dataset(out_dir) as tmp:
        out: list[Record] = []
        hidden_dice: list[float] = []
        unknown_types: set[str] = set()
        for record in progress(records, "pseudo-label"):
            link_or_copy(dataset_dir / record.image, tmp / record.image)
            is_train = record.split == "train"
            keeps_mask = record.mask is not None and record.id not in hidden
            if keeps_mask:
                link_or_copy(dataset_dir / record.mask, tmp / record.mask)
            if not is_train:
                out.append(record)
                continue
            base = record if keeps_mask else record.model_copy(update={
                "mask": None, "mask_sha256": None,
                "kind": "unlabelled" if record.kind == "still" else record.kind})
            if keeps_mask and record.kind in TRUSTED_KINDS:
                out.append(base.model_copy(update={"quality": "good"}))
                continue
            if model is None:
                out.append(base.model_copy(update={"quality": "good"}) if keeps_mask else base)
                continue
            truth = load_mask(dataset_dir, record) if keeps_mask else None
            try:
                pred = predict_with_tta(model, load_image(dataset_dir, record), params.evaluate.threshold,
                                        record.lesion_type)
            except UnknownLesionTypeError:
                # a per-type champion can't label a type it has never seen: that record trains
                # from its own label if it has one, and is otherwise left unlabelled
                unknown_types.add(record.lesion_type)
                out.append(base.model_copy(update={"quality": "good"}) if keeps_mask else base)
                continue
            value, method = score(cfg.scorer, pred, truth)
            update = {"score": round(value, 6), "score_method": method}
            if not keeps_mask and base.kind != "weak":  # weak labels get pixel labels from issue #6's GCN
                mask_rel = f"masks/{record.id}.png"
                # a mask G drew keeps G as its author: the champion only judged it
                update.update(kind="pseudo_label", mask=mask_rel, labelled_by=labeller,
                              mask_sha256=write_png(pred.mask.astype(np.uint8) * 255, tmp / mask_rel))
                if record.id in hidden:
                    hidden_dice.append(dice(pred.mask, load_mask(dataset_dir, record)))
            out.append(base.model_copy(update=update))

        # area-ratio weak records → pixel pseudo-labels with an ignore band (lesionflow.weak)
        out, weak_report = label_weak_records(params, dataset_dir, tmp, out, model, labeller)
        report.weak_model = weak_report.model_uri if weak_report else None
        scored = [r.score for r in out if r.score is not None]
        if model is not None or weak_report is not None:
            report.cutoff = quality_cutoff(scored, cfg.threshold, cfg.quantile)
            out = [r.model_copy(update={"quality": "good" if r.score >= report.cutoff else "bad"})
                   if r.score is not None else r for r in out]
        report.counts = {
            "good": sum(r.quality == "good" for r in out), "bad": sum(r.quality == "bad" for r in out),
            "pseudo_labelled": sum(r.kind == "pseudo_label" for r in out), "hidden": len(hidden)}
        report.hidden_mask_dice = float(np.mean(hidden_dice)) if hidden_dice else None
        if unknown_types:
            report.message += f"; {labeller} has no model for {sorted(unknown_types)}: not pseudo-labelled"
            print(report.message)
        write_index(tmp, out)
        (tmp / REPORT).write_text(json.dumps(report.__dict__, indent=2, sort_keys=True) + "\n")

    mlflow.log_params({"pseudo_label.labeller": labeller or "none", "pseudo_label.scorer": cfg.scorer})
    mlflow.log_metrics({f"n_{k}": v for k, v in report.counts.items()})
    if report.hidden_mask_dice is not None:
        mlflow.log_metric("hidden_mask_dice", report.hidden_mask_dice)
    if scored:
        mlflow.log_metric("score_median", float(np.median(scored)))
    mlflow.log_dict(report.__dict__, REPORT)
    return report
