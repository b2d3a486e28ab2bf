"""Typed configuration: one pydantic model per pipeline step under one root, validated once.

The models are the single source of every default (``Field(default, description=...)``);
``params.yaml`` is generated from them (``lesionflow params --write params.yaml``, a test fails on
drift). Files are deep-merged over the defaults and CLI ``--set key.path=value`` overrides are
applied to the raw mapping before validation, so they are checked exactly like the file.
Combinations no single section can judge (image size vs depth, ...) are checked by ``Params``.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lesionflow.errors import ConfigError


class _Section(BaseModel):
    # numbers are accepted where text is expected: `--set train.init_from=3` and `cpu: 4`
    # parse as YAML integers, but a version number or a CPU count is what they mean
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# URI schemes MLflow can keep runs and the registry in (``postgresql+psycopg2`` counts as postgresql)
_TRACKING_SCHEMES = {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"}


class RuntimeConfig(_Section):
    """Where things live. ``null`` means the embedded local default under ``workdir``."""

    workdir: str = Field(
        ".lesionflow", description="local artifacts, SQLite MLflow store, DVC workspace and remote "
        "(relative: to the current folder)")
    mlflow_tracking_uri: str | None = Field(
        None, description="null → sqlite:///<workdir>/mlflow.db; http://… for a server")
    dvc_remote: str | None = Field(
        None, description="null → <workdir>/dvc-remote; s3://bucket/prefix for S3")
    s3_endpoint_url: str | None = Field(
        None, description="for S3-compatible stores (MinIO, moto); also used by S3 sources")
    experiment: str = Field(
        "lesionflow", min_length=1, description="MLflow experiment of the pipeline runs")
    model_name: str = Field(
        "lesionflow-segmenter", min_length=1, description="registered model name in the MLflow "
        "registry")
    service_wait_seconds: float = Field(
        60, ge=0, description="how long a call waits for an unavailable MLflow server or DVC remote "
        "(exponential backoff with jitter) before failing with a named error")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_store(cls, value: str | None) -> str | None:
        scheme = value.partition("://")[0].partition("+")[0] if value and "://" in value else None
        if value is not None and scheme not in _TRACKING_SCHEMES:
            raise ValueError(f"{value!r} is not an MLflow store MLflow can use: set http(s)://host:port "
                             "for a tracking server, sqlite:////abs/path/mlflow.db, or null for the "
                             "embedded store under runtime.workdir")
        return value

    @field_validator("dvc_remote")
    @classmethod
    def _folder_or_s3(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError(f"{value!r}: set a folder, s3://bucket/prefix, or null for "
                             "<workdir>/dvc-remote (only the S3 backend of DVC is installed)")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must be an http(s):// URL, e.g. http://minio:9000")
        return value

    def resolved_workdir(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.resolved_workdir() / 'mlflow.db'}"

    def remote(self) -> str:
        return self.dvc_remote or str(self.resolved_workdir() / "dvc-remote")


class MetadataColumns(_Section):
    """Names of metadata-CSV columns; ``null`` means the field is not in the CSV."""

    id: str = Field(
        "id", description="record id: the image's path under images_dir, without extension")
    lesion_type: str | None = Field(None, description="lesion type of the record")
    group: str | None = Field(None, description="patient or video id: splits never cut a group")
    frame: str | None = Field(None, description="frame number → records become video frames")
    key_frame: str | None = Field(None, description="1/true marks a key frame")
    area_ratio: str | None = Field(None, description="weak label: lesion area / image area")
    area_error: str | None = Field(None, description="its estimate error")


class SplitFractions(_Section):
    train: float = Field(0.7, ge=0, le=1, description="share of the groups that train")
    val: float = Field(0.15, ge=0, le=1, description="share that selects the model (best epoch)")
    test: float = Field(0.15, ge=0, le=1, description="share held out for evaluation and the gate")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}: adjust ingest.split")
        return self


class IngestConfig(_Section):
    """How a folder (or S3 prefix) becomes a canonical dataset. See README "Bring your data"."""

    source: str = Field(
        "synthetic", description='"synthetic" (built-in generator), a folder, or s3://bucket/prefix')
    images_dir: str = Field("images", description="images under the source root")
    masks_dir: str = Field(
        "masks", description="masks under the source root (same relative path and stem)")
    mask_suffix: str = Field("", description='mask stem = image stem + suffix (e.g. "_mask")')
    metadata_csv: str | None = Field(
        None, description="CSV relative to the source root, columns mapped below")
    columns: MetadataColumns = Field(
        MetadataColumns(), description="metadata CSV column names (null: not in the CSV)")
    folder_fields: list[Literal["lesion_type", "group"]] = Field(
        [], description="e.g. [lesion_type, group] for images/<type>/<patient>/x.png")
    default_lesion_type: str = Field(
        "lesion", description="lesion type of records neither metadata nor folders type")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="raise | skip (skip lists what was left out)")
    annotator: str = Field(
        "unknown", description="who drew the masks (records say labelled_by annotator:<this>)")
    split: SplitFractions = Field(
        SplitFractions(), description="fractions of groups per split (sum to 1)")
    split_seed: int = Field(
        0, description="keys the split hash; apart from the top-level seed, so training seeds "
        "vary over one fixed train/val/test")
    max_side: int | None = Field(
        512, ge=16, description="downscale larger images on ingest (null keeps them)")
    volume_slice_axis: int = Field(
        2, ge=0, le=2, description="NIfTI/NRRD volumes are cut into 2-D slices along this axis")
    pseudonymize_ids: bool = Field(
        False, description="keyed pseudonyms for the ids, groups and paths of every source "
        "(DICOM sources always get them)")
    layout: Literal["files", "shards"] = Field(
        "files", description="how the DVC version stores the dataset: files (one object per image "
        "and mask) | shards (WebDataset tars, one split each; for large datasets, see docs/scaling.md)")
    shard_mb: float = Field(256, gt=0, description="layout shards: MiB of images and masks per shard")


class SyntheticConfig(_Section):
    """The deterministic synthetic lesion generator used when ``ingest.source: synthetic``."""

    n_images: int = Field(96, ge=4, description="labelled stills")
    n_videos: int = Field(
        4, ge=0, description="short videos of a drifting lesion, frame 0 marked as key frame")
    frames_per_video: int = Field(8, ge=2, description="frames per video")
    size: int = Field(96, ge=32, description="image side, px")
    lesion_types: list[str] = Field(
        ["round", "elongated"], description="shapes drawn, one lesion type each")
    n_weak: int = Field(
        8, ge=0, description="extra stills with an area ratio (± area_error) instead of a mask")
    seed: int = Field(
        0, description="seeds the drawing; apart from the top-level seed, so training seeds are "
        "compared on one dataset")


class ModelConfig(_Section):
    """The segmentation network: ``depth`` down/up levels, channels double from ``base_channels``."""

    arch: Literal["unet", "resunet"] = Field(
        "unet", description="unet: the classic U-Net, convolutions at full resolution | resunet: "
        "residual encoder from 1/2 resolution, ~3x fewer FLOPs per channel (models/resunet.py)")
    in_channels: Literal[1, 3] = Field(
        3, description="1 (gray) or 3 (RGB): images are converted to it")
    base_channels: int = Field(
        16, ge=4, description="channels of the first level, doubled at each level down")
    depth: int = Field(
        4, ge=1, le=6, description="down/up levels: train.image_size must be a multiple of 2**depth "
        "(unet) or 2**(depth+1) (resunet)")
    blocks: int = Field(2, ge=1, description="resunet: residual blocks per encoder stage")
    upsample: Literal["bilinear", "transpose"] = Field(
        "bilinear", description="bilinear | transpose")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="in the conv blocks (a model key a warm start may change)")
    tta: Literal["none", "h", "hv"] = Field(
        "none", description="test-time flips the registered model predicts with, averaged: none | "
        "h: + the horizontal flip (2 passes) | hv: + vertical and both (4 passes; frames/s drops "
        "about as much). Training validates one pass; a warm start may change it")

    @property
    def halvings(self) -> int:
        """How often the network halves its input: sides must be multiples of 2**halvings."""
        return self.depth + (self.arch == "resunet")


class TrainConfig(_Section):
    image_size: int = Field(96, ge=32, description="input side, px (multiple of 2**model.depth)")
    batch_size: int = Field(
        8, ge=1, description="images per step (also for pseudo-labelling and weak labels)")
    epochs: int = Field(12, ge=1, description="passes over the train split (plain training)")
    lr: float = Field(
        3e-3, gt=0, description="peak learning rate of the one-cycle schedule (AdamW)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    bce_weight: float = Field(
        0.5, ge=0, description="loss dice_bce = dice_weight · soft Dice + bce_weight · BCE")
    dice_weight: float = Field(0.5, ge=0, description="see bce_weight")
    augment: Literal["none", "flips", "strong"] = Field(
        "flips", description="none | flips: flips, quarter turns and a mild gain/offset | strong: "
        "also scale/shift/rotate, colour jitter and blur (albumentations)")
    loss: Literal["dice_bce", "structure"] = Field(
        "dice_bce", description="dice_bce: dice_weight · soft Dice + bce_weight · BCE | structure: "
        "boundary-weighted BCE + weighted IoU (PraNet), which stresses the lesion's edge")
    deep_supervision: float = Field(
        0.0, ge=0, description="resunet: weight of the loss on each coarser decoder level's own "
        "logits (0: off)")
    scales: list[float] = Field(
        [1.0], min_length=1, description="multi-scale training (plain training): each step resizes "
        "its batch to image_size times one of these, drawn at random and rounded to the network's "
        "multiple (PraNet trains at 0.75, 1, 1.25); validation and the registered model stay at "
        "image_size")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights with this "
        "decay, validate and ship it (null: off)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="fp32 | bf16: the forward pass under bfloat16 autocast, weights kept in "
        "fp32 (1.2-1.4x training images/s where the device has bf16 units: AVX-512 BF16 or AMX "
        "CPUs, Ampere+ GPUs; emulated and slower elsewhere) | auto: bf16 where the device has them")
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes (0: load in the training process)")
    max_minutes: float | None = Field(
        None, gt=0, description="wall-time budget: when plain training's epochs would not fit, its "
        "schedule is shortened to end (annealed) with the last epoch that does; weak-label "
        "training stops after the epoch that passes it; meta-training runs its outer_steps (null: "
        "no limit)")
    bad_pseudo_labels: Literal["drop", "keep"] = Field(
        "drop", description="drop (won on validation) | keep: pseudo-labels judged bad in plain training")
    init_from: str | None = Field(
        None, description="null: from scratch | champion | <version>: fine-tune its weights")
    deterministic: bool = Field(
        True, description="deterministic kernels, so `lesionflow reproduce` rebuilds exactly")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, value: Any) -> Any:
        """Older files say ``augment: true/false``; that meant flips or nothing."""
        return {True: "flips", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if any(scale <= 0 for scale in value):
            raise ValueError(f"scales must all be > 0, got {value}")
        return value

    @field_validator("init_from")
    @classmethod
    def _alias_or_version(cls, value: str | None) -> str | None:
        if value is not None and value != "champion" and not value.isdigit():
            raise ValueError(f"must be null, champion or a version number, got {value!r}")
        return value


class PseudoLabelConfig(_Section):
    """Champion pseudo-labels and their split into good / bad task data (MISSION section 2)."""

    model: str = Field("champion", description="alias or version number of the labelling model")
    scorer: Literal["tta", "dice"] = Field(
        "tta", description="tta: agreement under the 8 flips/quarter turns (no truth needed) | "
        "dice: against the ground truth where it exists (else tta)")
    threshold: float | None = Field(
        0.8, gt=0, lt=1, description="score >= threshold → good task data, else bad ...")
    quantile: float | None = Field(
        None, gt=0, lt=1, description="... or instead: scores above this quantile are good")
    hide_masks_fraction: float = Field(
        0.0, ge=0, lt=1, description="experiments: treat this share of train masks as unlabelled")

    @model_validator(mode="after")
    def _one_rule(self) -> PseudoLabelConfig:
        if (self.threshold is None) == (self.quantile is None):
            raise ValueError("set exactly one of pseudo_label.threshold or pseudo_label.quantile "
                             "(the other null)")
        return self


class MetaTrainConfig(_Section):
    """MAML-style meta-training over good/bad task data (MISSION section 3)."""

    enabled: bool = Field(
        False, description="true: meta-training | false (default; it won every comparison "
        "measured): plain supervised training (train section)")
    task_by: Literal["lesion_type", "group"] = Field(
        "lesion_type", description="lesion_type | group: what one task (training dataset) is")
    outer_steps: int = Field(60, ge=1, description="outer (meta) steps, one task each")
    inner_steps: int = Field(1, ge=1, description="SGD steps on the support batch per outer step")
    inner_lr: float = Field(
        0.01, gt=0, description="SGD step size of the inner loop (temporary weights)")
    outer_lr: float = Field(2e-3, gt=0, description="Adam on the original weights")
    order: Literal["first", "second"] = Field(
        "first", description="first (cheap default) | second (differentiate through inner)")
    support_size: int = Field(8, ge=1, description="primary batch → temporary weights")
    query_size: int = Field(
        8, ge=1, description="secondary batch → gradient at the temporary weights")
    bad_fraction: float = Field(
        0.25, ge=0, le=1, description="share of bad task data in each batch")
    query_from: Literal["same_task", "other_task"] = Field(
        "same_task", description="same_task (disjoint half of its data) | other_task (next task)")
    task_order: Literal["random", "ascending"] = Field(
        "ascending", description="ascending: worst-performing task first | random")
    rerank_every: int = Field(20, ge=1, description="outer steps between re-ranking the tasks")
    per_lesion_type: bool = Field(
        False, description="true: one model per lesion type behind one registered router")
    correction_weight: float = Field(
        3.0, gt=0, description="loss weight of reviewer corrections (others weigh 1), plain too")


class VideoConfig(_Section):
    """Next-frame model G, its training, key frames, synthesis from stills and label propagation
    (MISSION section 4). φ is always a *distance* (0 = identical), so θ's hinge pushes the masks of
    dissimilar frames at least ``gamma2`` apart; d is an image *similarity* (1 = identical)."""

    enabled: bool = Field(
        True, description="false: pass the dataset through (no synthesis, no propagation)")
    architecture: Literal["shared", "separate"] = Field(
        "shared", description="shared: one encoder, image + mask decoders | separate: two nets")
    mask_sees_next: bool = Field(
        False, description="separate only: the mask net also sees I_t+1 (synthesis: Î_t+1)")
    base_channels: int = Field(8, ge=4, description="channels of G's first level")
    depth: int = Field(3, ge=1, le=5, description="G's down/up levels")
    image_size: int = Field(64, ge=16, description="G's working size (multiple of 2**video.depth)")
    image_phi: Literal["l1", "l2", "dice"] = Field(
        "l1", description="φ of L_I: l1 | l2 | dice (all distances: 0 = identical)")
    mask_phi: Literal["l1", "l2", "dice"] = Field(
        "dice", description="φ of L_M1, L_M2: dice (1 - soft Dice) | l1 | l2")
    similarity: Literal["ssim", "l1"] = Field(
        "ssim", description="d of two frames: ssim (mean SSIM, gray) | l1 (1 - mean |a - b|)")
    gamma1: float = Field(
        0.5, ge=0, le=1, description="d >= gamma1: similar frames → masks must agree (loss φ) ...")
    gamma2: float = Field(
        0.3, ge=0, le=1, description="... else masks must differ by the margin: max(0, gamma2 - φ)")
    image_weight: float = Field(
        1.0, ge=0, description="total = wI·L_I + wM1·L_M1 + wM2·L_M2 (+ truth, + GAN)")
    mask1_weight: float = Field(1.0, ge=0, description="wM1")
    mask2_weight: float = Field(1.0, ge=0, description="wM2")
    truth_weight: float = Field(
        1.0, ge=0, description="φ(M_t+1, M̂_t+1) on frames with a true mask; 0 = spec losses only")
    gan_weight: float = Field(
        0.0, ge=0, description="> 0: adversarial term from a patch discriminator (0: off)")
    order: Literal["forward", "backward", "fused", "key_centred"] = Field(
        "key_centred", description="forward | backward | fused | key_centred (from a key frame)")
    initial_mask: Literal["key", "random"] = Field(
        "key", description="M̂_0: key (the key-frame mask) | random (a random blob)")
    teacher_forcing: float = Field(
        0.0, ge=0, le=1, description="probability of feeding the true M_t instead of G's own M̂_t")
    clip_length: int = Field(
        4, ge=2, description="frames per training clip (the rollout back-propagated)")
    batch_size: int = Field(4, ge=1, description="clips per step")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate of G")
    max_steps: int = Field(
        60, ge=1, description="stop at max_steps, or when the smoothed loss < loss_threshold,")
    loss_threshold: float | None = Field(
        None, gt=0, description="or after `patience` steps without a new best (null: off)")
    patience: int | None = Field(
        None, ge=1, description="steps without a new best smoothed loss (null: off)")
    key_frames: Literal["metadata", "auto"] = Field(
        "metadata", description="metadata (key_frame column; auto where none is marked) | auto")
    sharpness_weight: float = Field(1.0, ge=0, description="auto: variance of the Laplacian")
    centrality_weight: float = Field(1.0, ge=0, description="auto: lesion centroid near the centre")
    brightness_weight: float = Field(1.0, ge=0, description="auto: mean brightness near mid-grey")
    synth_steps: int = Field(8, ge=1, description="frames rolled forward from each train still")
    keep: Literal["every_k", "dissimilar", "similar"] = Field(
        "every_k", description="every_k | dissimilar | similar (by d to the last kept frame)")
    every_k: int = Field(2, ge=1, description="every_k: keep every k-th rolled frame")
    keep_threshold: float = Field(
        0.9, ge=0, le=1, description="dissimilar: keep frames with d below it | similar: at or "
        "above it")
    mix_ratio: float = Field(
        0.1, ge=0, description="synthetic frames added per real labelled train frame (0: none)")
    propagate: bool = Field(
        True, description="key-frame masks rolled through train videos → pseudo-labels")
    n_rollouts_logged: int = Field(
        2, ge=0, description="sample rollouts logged to MLflow (image strips + GIFs)")

    @model_validator(mode="after")
    def _size_fits_depth(self) -> VideoConfig:
        problem = size_problem("video.image_size", self.image_size, "video.depth", self.depth)
        if problem:
            raise ValueError(problem)
        if self.mask_sees_next and self.architecture != "separate":
            raise ValueError("mask_sees_next needs architecture: separate (a mask network of its "
                             "own): set video.architecture: separate or video.mask_sees_next: false")
        return self


def size_problem(size_key: str, size: int, depth_key: str, halvings: int) -> str | None:
    """Why a square input of side ``size`` cannot go through ``halvings`` halvings (a U-Net's
    levels), with the nearest sizes that can; None if it can. The deepest level must keep at least
    2x2 pixels: batch norm cannot train on a single pixel of a single image."""
    multiple = 2**halvings
    if size % multiple == 0 and size >= 2 * multiple:
        return None
    below, above = max(size // multiple * multiple, 2 * multiple), max(-(-size // multiple) * multiple,
                                                                       2 * multiple)
    sizes = f"{below}" if below == above else f"{below} or {above}"
    return (f"{size_key} {size} must be a multiple of {multiple} (the network halves it {halvings} "
            f"times, from {depth_key}) and at least "
            f"{2 * multiple}: set {size_key} to {sizes}, or lower {depth_key}")


class WeakLabelConfig(_Section):
    """Area-ratio weak labels → pixel pseudo-labels via superpixels + a GCN (MISSION section 2,
    seed 004; ``lesionflow.weak``). Runs inside the pseudo_label step on ``weak`` train records."""

    enabled: bool = Field(True, description="false: weak records stay unlabelled")
    n_superpixels: int = Field(
        64, ge=2, description="k-means clusters over [FCN features, colour, xy] per image")
    compactness: float = Field(
        1.0, ge=0, description="weight of position: one grid step costs one feature std")
    kmeans_iters: int = Field(5, ge=1, description="k-means assignment steps")
    connectivity: Literal[4, 8] = Field(
        4, description="4 | 8: pixel neighbourhood that joins two superpixels")
    sigma: float | None = Field(
        None, gt=0, description="edge weight exp(-d²/σ²); null: median edge distance per image")
    gcn_hidden: int = Field(32, ge=1, description="hidden width of the GCN")
    gcn_layers: int = Field(2, ge=1, description="graph propagations of the GCN")
    count_by: Literal["area", "vertices"] = Field(
        "area", description="area: n_fg by pixel area of the ranked vertices | vertices: r·N")
    default_error: float = Field(
        0.0, ge=0, lt=1, description="estimate error e for records without one (ignored band r±e)")
    epochs: int = Field(
        20, ge=1, description="re-rank → train rounds (train.batch_size, lr, image_size); "
        "from a champion the labels improved through all 20 (README, Weak labels)")
    labelled_per_weak: float = Field(
        4.0, ge=0, description="labelled train records mixed in per weak record")
    gcn_weight: float = Field(1.0, ge=0, description="vertex loss weight next to the pixel loss")
    size_weight: float = Field(
        0.0, ge=0, description="weight of the size penalty: predicted area outside r±e (0: off)")
    rank_by: Literal["gcn", "gcn+head"] = Field(
        "gcn", description="gcn | gcn+head: rank by the GCN, or by its mean with the head")
    n_logged: int = Field(
        4, ge=0, description="image strips (superpixels, pseudo mask, ignore band) in MLflow")


class EvaluateConfig(_Section):
    threshold: float = Field(
        0.5, gt=0, lt=1, description="probability above which a pixel counts as lesion")
    n_overlays: int = Field(
        8, ge=0, description="overlay images (image | truth | prediction) logged to MLflow")
    int8: bool = Field(
        True, description="serve an int8 twin of the ONNX graph (static, calibrated on train images) "
        "where validation Dice says it costs at most int8_max_dice_drop; else the float graph. "
        "Evaluated here, stored by register")
    int8_max_dice_drop: float = Field(
        0.005, ge=0, description="largest validation Dice the int8 graph may lose to the float one")
    int8_calibration_images: int = Field(
        64, ge=1, description="train images (evenly spaced) whose activations set the int8 ranges")


class RegistryConfig(_Section):
    """The promotion gate and the training lease (see ``registry.gate`` and ``lease``)."""

    gate_metric: Literal["dice", "iou"] = Field("dice", description="dice | iou")
    tolerance: float = Field(
        0.01, ge=0, description="promote unless worse than the champion by more than this ...")
    max_type_drop: float = Field(
        0.05, ge=0, description="... or any lesion type is worse by more than this")
    min_type_records: int = Field(
        3, ge=1, description="compared test records a type needs to be gated on its own")
    max_temporal_drop: float | None = Field(
        None, ge=0, description="refuse a candidate whose temporal_dice (Dice of consecutive predicted "
        "video masks) on the compared records is lower than the champion's by more than this; null: "
        "not checked")
    lease_seconds: float = Field(
        600, gt=0, description="a training run's lease expires this long after its last renewal")
    lease_wait_seconds: float = Field(
        0, ge=0, description="a second run waits this long for the lease, then stops")


class ServeConfig(_Section):
    """``lesionflow serve``: which version answers, where, and the request limits."""

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free one)")
    model: str = Field(
        "champion", description="alias or version number served; POST /reload re-resolves it")
    max_upload_bytes: int = Field(16 * 2**20, ge=1, description="larger request bodies get 413")
    min_side: int = Field(
        8, ge=1, description="images with a side outside [min_side, max_side] px get 422")
    max_side: int = Field(4096, ge=1, description="see min_side")
    follow_seconds: float | None = Field(
        30, gt=0, description="re-resolve the alias this often (null: only POST /reload does)")
    inference_workers: int = Field(
        2, ge=1, description="requests segmented at once (about the CPU cores)")
    max_queue: int = Field(
        8, ge=0, description="requests waiting for a worker; beyond, 503 + Retry-After at once")
    retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After of a busy 503 or of a failed reload")
    log_dir: str | None = Field(
        None, description="prediction log: every /predict answer, JSON lines in size-rotated "
        "segments (null: <workdir>/predictions; a shared volume when several replicas log)")
    log_max_bytes: int = Field(
        64 * 2**20, ge=1024, description="a log segment is closed before it grows past this")
    keep_images: bool = Field(
        False, description="also keep each image for the review queue, named by its content hash "
        "(PNG/JPEG as sent minus metadata, other formats as PNG)")
    image_store: str | None = Field(
        None, description="where kept images go: s3://bucket/prefix or a folder (null: "
        "<log_dir>/images)")

    @field_validator("image_store")
    @classmethod
    def _folder_or_s3_store(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ValueError(f"{value!r}: set a folder, s3://bucket/prefix, or null for <log_dir>/images")
        return value


class ReviewConfig(_Section):
    """``lesionflow review next``: which images reviewers label next (``lesionflow/review``)."""

    strategy: Literal["random", "entropy", "tta", "diversity-weighted"] = Field(
        "random", description="random (what to label to learn fastest: it beat diversity-weighted "
        "on the Kvasir-SEG learning curve, bench/learning_curve.py) | entropy (predictive entropy) | "
        "tta (TTA disagreement) | diversity-weighted (all three uncertainties, then spread over "
        "videos: the model's likely failures first)")
    diversity_weight: float = Field(
        0.7, ge=0, le=1, description="diversity-weighted: each pick from a video (or of a near-"
        "duplicate image) already in the batch scales a candidate's score by (1 - weight)")
    batch_size: int = Field(16, ge=1, description="images per batch (review next --n overrides)")


class CorrectionsConfig(_Section):
    """Reviewer corrections mixed into the train split by the ingest step (see corrections.py)."""

    dataset: str | None = Field(
        "latest", description="latest | <md5>.dir | null (none): corrections mixed into train")

    @field_validator("dataset")
    @classmethod
    def _latest_or_hash(cls, value: str | None) -> str | None:
        if value not in (None, "latest") and not re.fullmatch(r"[0-9a-f]{32}\.dir", value):
            raise ValueError(f"must be latest, null or a DVC directory hash (<32 hex>.dir), got {value!r}")
        return value


class ClusterTrainConfig(_Section):
    """Where the steps that train run on Kubernetes: node placement and resources per node, and
    with ``num_nodes`` > 1 a Kubeflow Trainer TrainJob for meta_train (``lesionflow.trainjob``)."""

    num_nodes: int = Field(
        1, ge=1, description="1: meta_train trains in its step's own pod | > 1: in a TrainJob of "
        "this many nodes (Kubeflow Trainer, needs an s3:// DVC remote and an http(s) MLflow server)")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu limit per node (and of synthesize_video)")
    cpu: str | None = Field(None, description='request = limit per node, e.g. "4"')
    memory: str | None = Field(None, description="request = limit per node, e.g. 16Gi")
    node_selector: dict[str, str] = Field(
        {}, description='e.g. {nvidia.com/gpu.present: "true"} for the nodes that train')
    procs_per_node: int | None = Field(
        None, ge=1, description="TrainJob: torch processes per node (null: the runtime's auto, one "
        "per GPU, else one per requested CPU)")
    runtime: str = Field(
        "torch-distributed", min_length=1, description="TrainJob: the ClusterTrainingRuntime it "
        "runs on")
    namespace: str | None = Field(
        None, description="TrainJob: its namespace (null: the step pod's own, else the kubeconfig "
        "context's)")
    output_prefix: str | None = Field(
        None, description="TrainJob: s3://bucket/prefix where rank 0 leaves the model for the step "
        "(null: s3://<bucket of runtime.dvc_remote>/trainjobs)")
    timeout_minutes: float = Field(
        240, gt=0, description="TrainJob: deleted and the step failed after this long")

    @field_validator("output_prefix")
    @classmethod
    def _s3_prefix(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"s3://[^/]{3,}(/.*)?", value):
            raise ValueError(f"{value!r} must be s3://bucket/prefix (the pods and the step share "
                             "no disk), or null")
        return value


# the flat keys the training steps' resources had before they moved into cluster.train
_MOVED_CLUSTER_KEYS = {"train_node_selector": "node_selector", "train_gpus": "gpus",
                       "train_cpu": "cpu", "train_memory": "memory"}


class ClusterConfig(_Section):
    """Kubernetes settings compiled into the pipeline (kfp-kubernetes); ignored by kfp.local."""

    credentials_secret: str | None = Field(
        "lesionflow-credentials", description="Secret whose keys below become env of every step")
    secret_env: list[str] = Field(
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
         "MLFLOW_TRACKING_PASSWORD", "LESIONFLOW_PSEUDONYM_KEY"],
        description="keys of that Secret passed to every step (S3 and MLflow credentials, the "
        "pseudonym key)")
    train: ClusterTrainConfig = Field(
        ClusterTrainConfig(), description="the steps that train (synthesize_video, meta_train): "
        "resources, placement, TrainJob")
    artifacts_pvc: str | None = Field(
        None, description="a PVC mounted at artifacts_mount in every step (else S3 only)")
    artifacts_mount: str = Field("/mnt/lesionflow", description="where artifacts_pvc is mounted")
    pipeline_root: str | None = Field(
        None, description="KFP artifact store, e.g. s3://lesionflow-data/kfp (null: KFP's)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Files written before cluster.train existed: name where each flat key went."""
        moved = [key for key in _MOVED_CLUSTER_KEYS if isinstance(raw, dict) and key in raw]
        if moved:
            raise ValueError("; ".join(f"cluster.{key} moved: set cluster.train.{_MOVED_CLUSTER_KEYS[key]}"
                                       for key in moved))
        return raw


class Params(_Section):
    """The root of ``params.yaml``."""

    seed: int = Field(0, description="seeds initial weights, sampling and augmentation (the split: "
                      "ingest.split_seed; synthetic data: synthetic.seed)")
    runtime: RuntimeConfig = Field(
        RuntimeConfig(), description="where things live (not part of params_hash)")
    ingest: IngestConfig = Field(
        IngestConfig(), description='source → canonical dataset (README "Bring your data")')
    synthetic: SyntheticConfig = Field(
        SyntheticConfig(), description='the generator used when ingest.source is "synthetic"')
    model: ModelConfig = Field(
        ModelConfig(), description="compact U-Net shared by every step that segments")
    train: TrainConfig = Field(
        TrainConfig(), description="plain supervised training; its image_size serves every step")
    pseudo_label: PseudoLabelConfig = Field(
        PseudoLabelConfig(), description="the champion labels unlabelled train images; masks get "
        "scored")
    weak_label: WeakLabelConfig = Field(
        WeakLabelConfig(), description="weak records (image + area ratio) → pixel pseudo-labels "
        "(seed 004)")
    meta_train: MetaTrainConfig = Field(
        MetaTrainConfig(), description="MAML over good/bad task data (replaces plain training)")
    video: VideoConfig = Field(
        VideoConfig(), description="synthesize_video: next-frame model G (MISSION section 4)")
    evaluate: EvaluateConfig = Field(
        EvaluateConfig(), description="the candidate on the test split")
    registry: RegistryConfig = Field(
        RegistryConfig(), description="the promotion gate and the training lease")
    serve: ServeConfig = Field(
        ServeConfig(), description="lesionflow serve: HTTP server in front of a registered version")
    corrections: CorrectionsConfig = Field(
        CorrectionsConfig(), description="reviewers' corrected masks (lesionflow corrections add)")
    review: ReviewConfig = Field(
        ReviewConfig(), description="the review queue: images ranked for reviewers (lesionflow "
        "review next)")
    cluster: ClusterConfig = Field(
        ClusterConfig(), description="compiled into the pipeline for KFP on Kubernetes (not "
        "kfp.local)")

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        """Combinations of keys from different sections, checked before any step runs rather than
        failing steps later; each line names the keys and what to set."""
        problems = [size_problem("train.image_size", self.train.image_size, "model.depth",
                                 self.model.halvings)]
        if self.train.deep_supervision and self.model.arch != "resunet":
            problems.append("train.deep_supervision needs model.arch: resunet (the unet has no "
                            "auxiliary heads): set it to 0 or switch the arch")
        if self.serve.min_side > self.serve.max_side:
            problems.append(f"serve.min_side {self.serve.min_side} is larger than serve.max_side "
                            f"{self.serve.max_side}: no image would be accepted; lower min_side or "
                            "raise max_side")
        if self.weak_label.enabled and self.weak_label.n_superpixels > self.train.image_size**2:
            problems.append(f"weak_label.n_superpixels {self.weak_label.n_superpixels} is more than "
                            f"the {self.train.image_size}x{self.train.image_size} pixels of "
                            "train.image_size: lower n_superpixels or raise train.image_size")
        meta = self.meta_train
        if meta.per_lesion_type and not meta.enabled:
            problems.append("meta_train.per_lesion_type: true trains one meta-learned model per lesion "
                            "type, but meta_train.enabled is false (plain training makes one model): "
                            "set meta_train.enabled: true, or per_lesion_type: false")
        if (meta.enabled and meta.per_lesion_type and meta.task_by == "lesion_type"
                and meta.query_from == "other_task"):
            problems.append("meta_train.query_from: other_task needs a second task, but with "
                            "per_lesion_type: true and task_by: lesion_type each model has one: set "
                            "meta_train.query_from: same_task or meta_train.task_by: group")
        if self.cluster.train.num_nodes > 1:
            runtime = self.runtime
            if not (runtime.dvc_remote or "").startswith("s3://"):
                problems.append("cluster.train.num_nodes > 1 needs runtime.dvc_remote: "
                                "s3://bucket/prefix (the training pods restore the dataset from it)")
            if not (runtime.mlflow_tracking_uri or "").startswith(("http://", "https://")):
                problems.append("cluster.train.num_nodes > 1 needs runtime.mlflow_tracking_uri: "
                                "http(s)://… (the training pods log to it and load warm-start weights)")
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def with_section(self, section: str, **values: Any) -> Params:
        """A copy with ``values`` replacing fields of one section, e.g. ``("train", init_from="3")``
        (a run pinned to what was resolved, not what the file says)."""
        return self.model_copy(update={section: getattr(self, section).model_copy(update=values)})

    def digest(self) -> str:
        """Stable hash of the tunables (where things run doesn't change results, so runtime,
        cluster, serve and review are excluded)."""
        payload = self.model_dump(mode="json", exclude={"runtime", "cluster", "serve", "review"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = ", ".join(sorted(section.model_fields)) if section else "?"
            msg = f"unknown key (allowed here: {allowed})"
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")  # cross-section rules name their keys
    return "invalid configuration:\n" + "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def validate(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML so ``1e-3``, ``true``, ``null``
    and ``[a, b]`` mean what they look like."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({_first_line(err, 'the value')}); "
                              "quote strings that hold : [ ] { } # or start with * & !") from None
    return raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a duplicated section would drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable keys: PyYAML reports those itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _first_line(err: Exception, source: str) -> str:
    """A YAML error on one line, naming ``source`` rather than PyYAML's "<unicode string>"."""
    return " ".join(str(err).replace('"<unicode string>"', source).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"params file {what}: {path} (in {Path.cwd()}); name an existing YAML "
                          f"file with --params, or leave --params out for the built-in defaults")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it "
                          "as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read params file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_first_line(err, str(path))}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level (section: {{key: value}}), "
                          f"not a {type(raw).__name__}")
    return raw


def load(paths: str | Path | list[str | Path] | None = None,
         overrides: list[str] | None = None) -> Params:
    """Read and deep-merge params files in order (later files win, e.g. ``params.yaml`` then
    ``configs/kvasir-seg.yaml``) over the built-in defaults, apply ``key=value`` overrides,
    validate once. ``paths=None`` (or ``[]``) means the built-in defaults alone."""
    if paths is None:
        paths = []
    elif not isinstance(paths, list):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        _deep_merge(raw, _read_yaml(Path(path)))
    return validate(apply_overrides(raw, overrides or []))


def from_json(text: str) -> Params:
    """Inverse of ``params.model_dump_json()`` — how pipeline components receive the config."""
    return validate(json.loads(text))


PARAMS_FILE = "params.yaml"  # read from the current folder when no --params is given
_COMMENT_COLUMN, _WIDTH = 32, 100
_HEADER = """\
# The built-in defaults of every tunable, grouped by step. Generated from lesionflow/config.py by
# `lesionflow params --write params.yaml` (a test fails when they differ): change defaults there.
# Change a run by layering a file on top (lesionflow run --params params.yaml configs/kvasir-seg.yaml)
# or with --set key.path=value. Unknown keys and bad values fail loudly, naming the key."""


def defaults_yaml() -> str:
    """The built-in defaults as commented YAML: every section and key in declaration order, each
    field's description as its comment. The checked-in ``params.yaml`` is exactly this text."""
    lines = _HEADER.splitlines()
    _section_lines(Params(), "", lines)
    return "\n".join(lines) + "\n"


def _section_lines(section: BaseModel, pad: str, lines: list[str]) -> None:
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            if not pad:
                lines.append("")
            lines += _commented(f"{pad}{name}:", field.description, pad)
            _section_lines(value, pad + "  ", lines)
        else:
            lines += _commented(f"{pad}{name}: {_yaml_value(value)}", field.description, pad)


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.strip().removesuffix("\n...")


def _commented(line: str, description: str | None, pad: str) -> list[str]:
    """``line`` with ``description`` as a trailing comment at the comment column, wrapped onto
    comment-only lines; above the line when the line itself is too long for that."""
    if not description:
        return [line]
    column = max(_COMMENT_COLUMN, len(line) + 2)
    if column > 60:
        return [f"{pad}# {part}" for part in textwrap.wrap(description, _WIDTH - len(pad) - 2)] + [line]
    first, *rest = textwrap.wrap(description, _WIDTH - column - 2)
    return [f"{line.ljust(column)}# {first}", *(f"{' ' * column}# {part}" for part in rest)]
