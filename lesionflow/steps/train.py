"""Train step: the plain supervised baseline on the labelled train split of a canonical dataset."""

from __future__ import annotations

from pathlib import Path

import mlflow

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.data.manifest import Record, is_bad, read_fingerprint, read_manifest
from lesionflow.data.shards import ShardSource, ShardStream
from lesionflow.errors import EmptySplitError, WarmStartError
from lesionflow.meta import sample_weights
from lesionflow.models import build_model
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import save_model
from lesionflow.training import FitResult, SegmentationDataset, fit, labelled

# ``model`` keys that decide the weights' shapes; dropout has no weights, so it may change
_FREE_KEYS = {"dropout"}  # model keys a warm start may change: they shape no weight


def init_version(params: Params) -> str | None:
    """The registered version number ``train.init_from`` names; None means from scratch.

    ``champion`` with no champion yet (the first run of a scheduled retrain) is None, with a note;
    a version number the registry lacks raises ``RegistryError``. Every call asks the registry
    anew: to record the version a run starts from, call this once and pass the number on as
    ``train.init_from`` — a number resolves to itself, so the weights loaded and the version
    recorded agree even if the champion moves meanwhile."""
    ref = params.train.init_from
    if ref is None:
        return None
    name = params.runtime.model_name
    if ref == registry.CHAMPION:
        version = registry.champion_version(name)
        if version is None:
            print(f"train.init_from: champion, but {name!r} has no champion yet: training from scratch")
        return version
    return registry.resolve(name, ref)


def new_segmenter(params: Params, dataset_dir: Path, lesion_type: str | None = None) -> Segmenter:
    """The model training starts from.

    ``train.init_from: null`` (or no champion yet): untrained, input normalisation from the
    dataset fingerprint, ``train.image_size``. Otherwise a copy of the weights of the version
    ``init_version`` resolves (the registry is asked once, and that number is what is loaded),
    keeping that version's image size and mean/std rather than this dataset's: its weights were
    trained on inputs scaled that way. ``model.dropout`` comes from params; any other ``model``
    key that differs from the version's raises ``WarmStartError``. From a per-lesion-type version
    (``LesionTypeRouter``), the model of ``lesion_type`` (per-type training names it) starts from
    that type's weights, a type the version has no model for from scratch, and a shared model
    (``lesion_type=None``) only from a version holding a single model.
    """
    version = init_version(params)
    if version is None:
        return _from_scratch(params, dataset_dir)
    source = _warm_source(params, version, lesion_type)
    if source is None:
        print(f"warm start: {params.runtime.model_name} v{version} has no model for lesion type "
              f"{lesion_type!r}: its model trains from scratch")
        return _from_scratch(params, dataset_dir)
    return _warm_start(params, version, source)


def _warm_source(params: Params, version: str, lesion_type: str | None) -> Segmenter | None:
    """The registered model to start from (None: a type the per-type version lacks)."""
    name = params.runtime.model_name
    source = registry.load_model(name, version)
    if not isinstance(source, LesionTypeRouter):
        return source
    if lesion_type is not None:
        return source.route(lesion_type) if lesion_type in source.lesion_types else None
    if len(source.lesion_types) != 1:
        raise WarmStartError(
            f"train.init_from: {name} v{version} is one model per lesion type "
            f"({', '.join(source.lesion_types)}) and a shared model cannot start from several; "
            f"set train.init_from to a version with one model, or null to train from scratch")
    return source.route(source.lesion_types[0])


def _from_scratch(params: Params, dataset_dir: Path) -> Segmenter:
    stats = read_fingerprint(dataset_dir)["intensity"]
    mean, std = _per_model_channel(stats["mean"], params.model.in_channels), _per_model_channel(
        stats["std"], params.model.in_channels)
    # a constant dataset has std 0; 1 grey level keeps the division finite
    return Segmenter(build_model(params.model), params.train.image_size, mean, [max(s, 1.0) for s in std],
                     params.model.tta)


def _warm_start(params: Params, version: str, source: Segmenter) -> Segmenter:
    name = params.runtime.model_name
    wanted, have = ({"arch": "unet", **hparams} for hparams in (build_model(params.model).hparams,
                                                                 source.net.hparams))
    differ = [k for k in sorted((wanted.keys() | have.keys()) - _FREE_KEYS) if wanted.get(k) != have.get(k)]
    if differ:
        raise WarmStartError(
            f"train.init_from: {name} v{version} has another architecture: "
            + ", ".join(f"model.{k} is {wanted.get(k)!r} here but {have.get(k)!r} in "
                        f"v{version}" for k in differ)
            + f"; set {'them' if len(differ) > 1 else 'it'} as in v{version} to fine-tune it, "
              "or train.init_from: null to train the new architecture from scratch")
    if params.train.image_size != source.image_size:
        print(f"warm start from {name} v{version}: training at its image size {source.image_size}, "
              f"not train.image_size {params.train.image_size}")
    model = Segmenter(build_model(params.model), source.image_size, source.mean.flatten().tolist(),
                      source.std.flatten().tolist(), params.model.tta)
    model.load_state_dict(source.state_dict())  # weights, batch-norm statistics, mean/std
    print(f"warm start from {name} v{version}")
    return model


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


def plain_train_records(params: Params, records: list[Record]) -> list[Record]:
    """The labelled train records plain training fits on: without the pseudo-labels judged bad
    unless ``train.bad_pseudo_labels: keep`` (dropping them won on validation: README)."""
    train = labelled(records, "train")
    return train if params.train.bad_pseudo_labels == "keep" else [r for r in train if not is_bad(r)]


def train(params: Params, dataset_dir: Path, out_dir: Path,
          train_shards: ShardSource | None = None) -> FitResult:
    """Fit on ``train``, select on ``val``, save the model to ``out_dir``; log to the active run.

    With ``train_shards`` the train split is streamed from them (``data.shards.ShardStream``: each
    rank and DataLoader worker its own shards) instead of read from ``dataset_dir``, which then
    needs only its manifest, fingerprint and val split on disk."""
    records = read_manifest(dataset_dir)
    if not labelled(records, "val"):
        raise EmptySplitError("plain training (meta_train.enabled: false) keeps the epoch with the best "
                              "validation Dice, but the val split has no labelled records: give "
                              "ingest.split.val a share > 0 (or more groups)")
    model = new_segmenter(params, dataset_dir)
    train_records = plain_train_records(params, records)
    weights = sample_weights([r.kind for r in train_records], params.meta_train.correction_weight)
    if train_shards is None:
        train_set = SegmentationDataset(dataset_dir, train_records, model, augment=params.train.augment,
                                        seed=params.seed, sample_weights=list(weights))
    else:
        train_set = ShardStream(train_shards, train_records, model, augment=params.train.augment,
                                seed=params.seed, sample_weights=list(weights),
                                batch_size=params.train.batch_size, num_workers=params.train.num_workers)
    val_set = SegmentationDataset(dataset_dir, labelled(records, "val"), model)
    mlflow.log_params({f"model.{k}": v for k, v in params.model.model_dump().items()})
    mlflow.log_params({f"train.{k}": v for k, v in params.train.model_dump().items()})
    mlflow.log_params({"n_train": len(train_set), "n_val": len(val_set)})

    def log_epoch(row: dict) -> None:
        mlflow.log_metrics({k: row[k] for k in ("train_loss", "val_dice", "lr")}, step=row["epoch"])

    result = fit(model, train_set, val_set, params.train, seed=params.seed, on_epoch=log_epoch)
    mlflow.log_metrics({"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run, "train_seconds": result.seconds})
    mlflow.log_param("trained_precision", result.precision)
    mlflow.log_figure(learning_curves(result), "learning_curves.png")
    save_model(model, out_dir)
    return result
