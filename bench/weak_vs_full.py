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
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from filelock import FileLock

from bench.harness import digest
from lesionflow.config import Params
from lesionflow.data.manifest import read_manifest
from lesionflow.data.transforms import load_target
from lesionflow.data.weaken import weaken
from lesionflow.metrics import dice
from lesionflow.steps.evaluate import score_model
from lesionflow.steps.train import new_segmenter
from lesionflow.training import SegmentationDataset, fit, labelled, seed_everything
from lesionflow.weak.train import WeakTrainingSet, fit_weak


def weak_dataset(dataset: Path, noise: float, error: float | None, cache: Path) -> Path:
    """``dataset`` with every train mask turned into its area ratio (± ``noise``, drawn once: the
    training seeds share it) and estimate error ``error`` (default: ``noise``), cached next to it."""
    out = cache / "datasets" / f"{dataset.name}-weak-{digest(noise, error)}"
    with FileLock(f"{out}.lock"):
        if not out.is_dir():
            weaken(dataset, out, noise=noise, error=error, seed=0)
    return out


def log_epoch(row: dict) -> None:
    """Each epoch's numbers in the active MLflow run, stepped by epoch (the chart view's curves)."""
    mlflow.log_metrics({f"epoch/{k}": float(v) for k, v in row.items()
                        if isinstance(v, (int, float)) and k != "epoch"}, step=int(row["epoch"]))


def run_arm(params: Params, dataset: Path, arm: dict, seed: int, cache: Path) -> dict[str, float]:
    """val_dice (best epoch), test_dice, test Dice per lesion type, and for the weak arm the final
    pseudo-labels' Dice against the hidden train masks and their ignored share."""
    labels = arm.get("labels", "weak")
    if labels not in ("full", "weak"):
        raise SystemExit(f"labels must be full or weak, not {labels!r}")
    seed_everything(seed, params.train.deterministic)
    data = dataset if labels == "full" else weak_dataset(dataset, float(arm.get("noise", 0.0)), arm.get("error"), cache)
    records = read_manifest(data)
    val, test = labelled(records, "val"), labelled(records, "test")
    model = new_segmenter(params, data)
    val_set = SegmentationDataset(data, val, model)
    metrics: dict[str, float] = {}
    if labels == "full":
        train = SegmentationDataset(data, labelled(records, "train"), model, augment=params.train.augment, seed=seed)
        metrics["val_dice"] = fit(model, train, val_set, params.train, seed=seed,
                                  on_epoch=log_epoch).best_val_dice
    else:
        weak = [r for r in records if r.kind == "weak"]
        train = WeakTrainingSet(data, [], weak, model, params.weak_label.default_error,
                                augment=params.train.augment, seed=seed)
        fitted = fit_weak(model, train, params.weak_label, params.train, seed=seed, val=val_set,
                          on_epoch=log_epoch)
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
