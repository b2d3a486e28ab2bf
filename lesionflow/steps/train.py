"""Train step: the plain supervised baseline on the labelled train split of a canonical dataset."""

from __future__ import annotations

from pathlib import Path

import mlflow

from lesionflow.config import Params
from lesionflow.data.manifest import read_fingerprint, read_manifest
from lesionflow.meta import sample_weights
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import save_model
from lesionflow.training import FitResult, SegmentationDataset, fit, labelled


def new_segmenter(params: Params, dataset_dir: Path) -> Segmenter:
    """An untrained model whose input normalisation comes from the dataset fingerprint."""
    stats = read_fingerprint(dataset_dir)["intensity"]
    mean, std = _per_model_channel(stats["mean"], params.model.in_channels), _per_model_channel(
        stats["std"], params.model.in_channels)
    # a constant dataset has std 0; 1 grey level keeps the division finite
    return Segmenter(build_model(params.model), params.train.image_size, mean, [max(s, 1.0) for s in std])


def _per_model_channel(values: list[float], channels: int) -> list[float]:
    """Dataset channel statistics mapped the way ``to_channels`` maps the pixels."""
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"dataset has {len(values)} channels, model.in_channels is {channels}")


def learning_curves(result: FitResult):
    """Train loss and validation Dice per epoch, best epoch marked: the picture reviewers check
    first when comparing runs."""
    import matplotlib

    matplotlib.use("Agg")  # pipeline steps have no display
    from matplotlib.figure import Figure

    epochs = [row["epoch"] + 1 for row in result.history]
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_loss"] for row in result.history], marker=".")
    loss_ax.set(xlabel="epoch", ylabel="train loss (Dice + BCE)")
    dice_ax.plot(epochs, [row["val_dice"] for row in result.history], marker=".", color="tab:green")
    dice_ax.axvline(result.best_epoch + 1, color="grey", linestyle=":", label="kept weights")
    dice_ax.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    dice_ax.legend(loc="lower right")
    return fig


def train(params: Params, dataset_dir: Path, out_dir: Path) -> FitResult:
    """Fit on ``train``, select on ``val``, save the model to ``out_dir``; log to the active run."""
    records = read_manifest(dataset_dir)
    model = new_segmenter(params, dataset_dir)
    train_records = labelled(records, "train")
    weights = sample_weights([r.kind for r in train_records], params.meta_train.correction_weight)
    train_set = SegmentationDataset(dataset_dir, train_records, model, augment=params.train.augment,
                                    seed=params.seed, sample_weights=list(weights))
    val_set = SegmentationDataset(dataset_dir, labelled(records, "val"), model)
    mlflow.log_params({f"model.{k}": v for k, v in params.model.model_dump().items()})
    mlflow.log_params({f"train.{k}": v for k, v in params.train.model_dump().items()})
    mlflow.log_params({"n_train": len(train_set), "n_val": len(val_set)})

    def log_epoch(row: dict) -> None:
        mlflow.log_metrics({k: row[k] for k in ("train_loss", "val_dice", "lr")}, step=row["epoch"])

    result = fit(model, train_set, val_set, params.train, seed=params.seed, on_epoch=log_epoch)
    mlflow.log_metrics({"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                        "train_seconds": result.seconds})
    mlflow.log_figure(learning_curves(result), "learning_curves.png")
    save_model(model, out_dir)
    return result
