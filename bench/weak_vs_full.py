"""Area ratios only vs full masks on real data, same network, same budget: the ``weak`` kind of
``bench/experiment.py`` (issues 6, 16; arms in ``experiments/weak-*.yaml``).

One arm run, through the package's own functions as the pipeline runs them:

1. the dataset, ingested once and cached (``harness.cached_dataset``);
2. ``labels: full``: plain supervised training on the train masks (``training.fit``);
   ``labels: weak``: the train masks become their lesion area ratios (``weaken``; ``noise`` adds
   uniform error up to that much and records it as the estimate error e, or ``error`` if given;
   val/test keep their masks), then ``weak.train.fit_weak`` on the ratios alone (superpixels → graph → GCN → count
   rule, re-ranked every epoch) — the same network, image size, batch, LR schedule and epochs;
   both keep the weights of their best validation-Dice epoch;
3. scored on the test split at native resolution (``evaluate.score_model``), per lesion type too;
   the weak arm's final pseudo-labels are also compared with the hidden train masks.

``seed_from: <dataset>`` is the pipeline's usual case: a champion trained with masks is there when
the ratios arrive — from another source (``cvc-clinicdb`` for Kvasir-SEG), or from a few masks of
the same one (``seed_from`` its own name with ``seed_masks: 0.1``, a seeded tenth of its train
masks; the weak arm then still sees only ratios for every train image). That model (the arm's
params, best epoch on the source's val split, cached per seed) starts the weak or full arm and
ranks the first epoch's superpixels (``fit_weak(pretrained=True)``); ``labels: none`` scores it
as it is, so the table shows what the ratios add to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from filelock import FileLock

from bench import harness
from lesionflow.config import Params
from lesionflow.data.manifest import read_manifest
from lesionflow.data.transforms import load_target
from lesionflow.data.weaken import weaken
from lesionflow.metrics import dice
from lesionflow.models.segmenter import Segmenter
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.train import new_segmenter
from lesionflow.training import (
    SegmentationDataset,
    fit,
    labelled,
    pick_device,
    seed_everything,
    validation_dice,
)
from lesionflow.weak.train import WeakTrainingSet, fit_weak


def weak_dataset(dataset: Path, noise: float, error: float | None, cache: Path) -> Path:
    """``dataset`` with every train mask turned into its area ratio (± ``noise``, drawn once: the
    training seeds share it) and estimate error ``error`` (default: ``noise``), cached next to it."""
    out = cache / "datasets" / f"{dataset.name}-weak-{harness.digest(noise, error)}"
    with FileLock(f"{out}.lock"):
        if not out.is_dir():
            weaken(dataset, out, noise=noise, error=error, seed=0)
    return out


def seed_model(params: Params, source: str, share: float, seed: int, cache: Path) -> Segmenter:
    """``params``' model trained on ``source``'s train masks (its own split, best epoch on its val
    split) — a seeded random ``share`` of them below 1 — cached by everything that changes it: the
    params but ingest and weak_label, the source dataset's key, the share, the seed and the package
    code."""
    if not 0 < share <= 1:
        raise SystemExit(f"seed_masks must lie in (0, 1], not {share}")
    other = harness.load_params(source, cache, params.runtime.experiment, [])
    seed_params = params.model_copy(update={"ingest": other.ingest})
    dataset, dataset_key = harness.cached_dataset(seed_params, cache)
    key = harness.digest(params.model_dump(mode="json", exclude={"runtime", "ingest", "weak_label"}), dataset_key,
                         share, seed, harness.package_code())
    path = cache / "seed-models" / f"{source}-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            records = read_manifest(dataset)
            train = labelled(records, "train")
            if share < 1:
                keep = np.random.default_rng(seed).choice(len(train), max(1, round(share * len(train))), replace=False)
                train = [train[i] for i in sorted(keep)]
            model = new_segmenter(seed_params, dataset)
            fit(model, SegmentationDataset(dataset, train, model, augment=params.train.augment, seed=seed),
                SegmentationDataset(dataset, labelled(records, "val"), model), params.train, seed=seed)
            model.save(path)
    return Segmenter.load(path)


def run_arm(params: Params, dataset: Path, arm: dict, seed: int, cache: Path) -> dict[str, float]:
    """val_dice (best epoch), test_dice, test Dice per lesion type, and for the weak arm the final
    pseudo-labels' Dice against the hidden train masks and their ignored share."""
    labels, source = arm.get("labels", "weak"), arm.get("seed_from")
    if labels not in ("full", "weak", "none"):
        raise SystemExit(f"labels must be full, weak or none, not {labels!r}")
    if labels == "none" and not source:
        raise SystemExit("labels: none scores the seed_from model: name its dataset")
    seed_everything(seed, params.train.deterministic)
    data = dataset if labels == "full" else weak_dataset(dataset, float(arm.get("noise", 0.0)), arm.get("error"), cache)
    records = read_manifest(data)
    val, test = labelled(records, "val"), labelled(records, "test")
    share = float(arm.get("seed_masks", 1.0))
    model = seed_model(params, source, share, seed, cache) if source else new_segmenter(params, data)
    val_set = SegmentationDataset(data, val, model)
    metrics: dict[str, float] = {}
    if labels == "none":
        metrics["val_dice"] = validation_dice(model, val_set, pick_device(params.train.device), params.train.batch_size)
    elif labels == "full":
        train = SegmentationDataset(data, labelled(records, "train"), model, augment=params.train.augment, seed=seed)
        metrics["val_dice"] = fit(model, train, val_set, params.train, seed=seed,
                                  on_epoch=harness.log_epoch).best_val_dice
    else:
        weak = [r for r in records if r.kind == "weak"]
        train = WeakTrainingSet(data, [], weak, model, params.weak_label.default_error,
                                augment=params.train.augment, seed=seed)
        fitted = fit_weak(model, train, params.weak_label, params.train, seed=seed, val=val_set,
                          pretrained=bool(source), on_epoch=harness.log_epoch)
        metrics["val_dice"] = fitted.best_val_dice
        truth = {r.id: r for r in labelled(read_manifest(dataset), "train")}
        size = params.train.image_size
        metrics["pseudo_dice"] = float(np.mean([
            dice(a.target == 1, load_target(dataset, truth[r.id], size) == 1)
            for r, a in zip(weak, fitted.annotations, strict=True)]))
        metrics["ignored_share"] = float(np.mean([(a.target == -1).mean() for a in fitted.annotations]))
    scored = score_model(model, data, test, params.evaluate.threshold)
    metrics["test_dice"] = scored.overall("dice")
    for lesion_type, row in scored.table.items():
        if lesion_type != "overall":
            metrics[f"test_dice_{lesion_type}"] = row["dice"]
    return metrics
