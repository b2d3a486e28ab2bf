"""Typed configuration: one pydantic model per pipeline step under one root, validated once.

``params.yaml`` is the single source of every tunable; CLI ``--set key.path=value`` overrides are
applied to the raw mapping before validation so they are checked exactly like the file.
"""

from __future__ import annotations

import hashlib
import json
import re
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
    model_config = ConfigDict(extra="forbid")


class RuntimeConfig(_Section):
    """Where things live. ``null`` means the embedded local default under ``workdir``."""

    workdir: str = ".lesionflow"
    mlflow_tracking_uri: str | None = None
    dvc_remote: str | None = None
    s3_endpoint_url: str | None = None
    experiment: str = "lesionflow"
    model_name: str = "lesionflow-segmenter"

    def resolved_workdir(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.resolved_workdir() / 'mlflow.db'}"

    def remote(self) -> str:
        return self.dvc_remote or str(self.resolved_workdir() / "dvc-remote")


class MetadataColumns(_Section):
    """Names of metadata-CSV columns; ``null`` means the field is not in the CSV."""

    id: str = "id"
    lesion_type: str | None = None
    group: str | None = None
    frame: str | None = None
    key_frame: str | None = None
    area_ratio: str | None = None
    area_error: str | None = None


class SplitFractions(_Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class IngestConfig(_Section):
    """How a folder (or S3 prefix) becomes a canonical dataset. See README "Bring your data"."""

    source: str = "synthetic"
    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_suffix: str = ""
    metadata_csv: str | None = None
    columns: MetadataColumns = MetadataColumns()
    folder_fields: list[Literal["lesion_type", "group"]] = []
    default_lesion_type: str = "lesion"
    on_error: Literal["raise", "skip"] = "raise"
    annotator: str = "unknown"  # who drew the source's masks (provenance of ground truth)
    split: SplitFractions = SplitFractions()
    max_side: int | None = Field(512, ge=16)
    volume_slice_axis: int = Field(2, ge=0, le=2)


class SyntheticConfig(_Section):
    """The deterministic synthetic lesion generator used when ``ingest.source: synthetic``."""

    n_images: int = Field(96, ge=4)
    n_videos: int = Field(4, ge=0)
    frames_per_video: int = Field(8, ge=2)
    size: int = Field(96, ge=32)
    lesion_types: list[str] = ["round", "elongated"]
    n_weak: int = Field(0, ge=0)  # extra stills carrying an area ratio instead of a mask


class ModelConfig(_Section):
    """Compact U-Net: ``depth`` down/up levels, channels double from ``base_channels``."""

    in_channels: int = Field(3, ge=1)
    base_channels: int = Field(16, ge=4)
    depth: int = Field(4, ge=1, le=6)
    upsample: Literal["bilinear", "transpose"] = "bilinear"
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Section):
    image_size: int = Field(128, ge=32)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    bce_weight: float = Field(0.5, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    augment: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    # null: from scratch | champion | a version number: fine-tune from that registered version's
    # weights (seeds 002/003: corrections update the model rather than replace it)
    init_from: str | None = None
    deterministic: bool = True  # deterministic kernels, so `lesionflow reproduce` rebuilds exactly

    @field_validator("init_from")
    @classmethod
    def _alias_or_version(cls, value: str | None) -> str | None:
        if value is not None and value != "champion" and not value.isdigit():
            raise ValueError(f"must be null, champion or a version number, got {value!r}")
        return value


class PseudoLabelConfig(_Section):
    """Champion pseudo-labels and their split into good / bad task data (MISSION section 2)."""

    model: str = "champion"  # alias or version number of the labelling model
    scorer: Literal["tta", "dice"] = "tta"  # tta: agreement under flips/rotations, no truth needed
    threshold: float | None = Field(0.8, gt=0, lt=1)  # score >= threshold → good task data
    quantile: float | None = Field(None, gt=0, lt=1)  # or: the top (1 - quantile) share is good
    hide_masks_fraction: float = Field(0.0, ge=0, lt=1)  # experiments: unlabel part of train

    @model_validator(mode="after")
    def _one_rule(self) -> PseudoLabelConfig:
        if (self.threshold is None) == (self.quantile is None):
            raise ValueError("set exactly one of threshold or quantile")
        return self


class MetaTrainConfig(_Section):
    """MAML-style meta-training over good/bad task data (MISSION section 3)."""

    enabled: bool = True  # false: the plain supervised baseline trains instead
    task_by: Literal["lesion_type", "group"] = "lesion_type"
    outer_steps: int = Field(60, ge=1)
    inner_steps: int = Field(1, ge=1)
    inner_lr: float = Field(0.01, gt=0)
    outer_lr: float = Field(2e-3, gt=0)
    order: Literal["first", "second"] = "first"
    support_size: int = Field(8, ge=1)
    query_size: int = Field(8, ge=1)
    bad_fraction: float = Field(0.25, ge=0, le=1)  # share of bad task data in each batch
    query_from: Literal["same_task", "other_task"] = "same_task"
    task_order: Literal["random", "ascending"] = "ascending"  # ascending: worst task first
    rerank_every: int = Field(20, ge=1)
    per_lesion_type: bool = False
    correction_weight: float = Field(3.0, gt=0)


class VideoConfig(_Section):
    """Next-frame model G, its training, key frames, synthesis from stills and label propagation
    (MISSION section 4). φ is always a *distance* (0 = identical), so θ's hinge pushes the masks of
    dissimilar frames at least ``gamma2`` apart; d is an image *similarity* (1 = identical)."""

    enabled: bool = True  # false: the synthesize_video step passes the dataset through unchanged
    architecture: Literal["shared", "separate"] = "shared"  # one encoder + two decoders | two nets
    mask_sees_next: bool = False  # separate only: the mask net also sees I_t+1 (Î_t+1 in synthesis)
    base_channels: int = Field(8, ge=4)
    depth: int = Field(3, ge=1, le=5)
    image_size: int = Field(64, ge=16)  # multiple of 2**depth
    image_phi: Literal["l1", "l2", "dice"] = "l1"  # φ of the image loss L_I
    mask_phi: Literal["l1", "l2", "dice"] = "dice"  # φ of the mask losses L_M1, L_M2 (1 - soft Dice)
    similarity: Literal["ssim", "l1"] = "ssim"  # d: mean SSIM of gray frames | 1 - mean |I_a - I_b|
    gamma1: float = Field(0.5, ge=0, le=1)  # d >= gamma1: similar frames, masks must agree
    gamma2: float = Field(0.3, ge=0, le=1)  # margin: dissimilar frames' masks differ by >= gamma2
    image_weight: float = Field(1.0, ge=0)  # weights of L_I, L_M1, L_M2 in the summed loss
    mask1_weight: float = Field(1.0, ge=0)
    mask2_weight: float = Field(1.0, ge=0)
    truth_weight: float = Field(1.0, ge=0)  # φ(M_t+1, M̂_t+1) where a true mask exists; 0 = spec only
    gan_weight: float = Field(0.0, ge=0)  # > 0 adds a patch discriminator on (I_t, Î_t+1)
    order: Literal["forward", "backward", "fused", "key_centred"] = "key_centred"
    initial_mask: Literal["key", "random"] = "key"  # M̂_0 at t = 0
    teacher_forcing: float = Field(0.0, ge=0, le=1)  # P(feed the true M_t instead of M̂_t)
    clip_length: int = Field(4, ge=2)  # frames per training clip (the rollout back-propagated)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_steps: int = Field(60, ge=1)  # stop: whichever of max_steps, loss_threshold, patience first
    loss_threshold: float | None = Field(None, gt=0)  # on the smoothed total loss
    patience: int | None = Field(None, ge=1)  # steps without a new best smoothed loss
    key_frames: Literal["metadata", "auto"] = "metadata"  # metadata falls back to auto if unmarked
    sharpness_weight: float = Field(1.0, ge=0)  # auto key frames: variance of the Laplacian ...
    centrality_weight: float = Field(1.0, ge=0)  # ... lesion centroid near the image centre ...
    brightness_weight: float = Field(1.0, ge=0)  # ... mean brightness near mid-grey
    synth_steps: int = Field(8, ge=1)  # frames rolled forward from each still
    keep: Literal["every_k", "dissimilar", "similar"] = "every_k"
    every_k: int = Field(2, ge=1)
    keep_threshold: float = Field(0.9, ge=0, le=1)  # d to the last kept frame: < keeps dissimilar
    mix_ratio: float = Field(0.1, ge=0)  # synthetic frames written per real labelled train frame
    propagate: bool = True  # roll key-frame masks through train videos with unlabelled frames
    n_rollouts_logged: int = Field(2, ge=0)  # sample rollouts (image strip + GIF) in MLflow

    @model_validator(mode="after")
    def _size_fits_depth(self) -> VideoConfig:
        if self.image_size % 2**self.depth:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2**depth = "
                             f"{2**self.depth}")
        if self.mask_sees_next and self.architecture != "separate":
            raise ValueError("mask_sees_next needs architecture: separate (a mask network of its own)")
        return self


class WeakLabelConfig(_Section):
    """Area-ratio weak labels → pixel pseudo-labels via superpixels + a GCN (MISSION section 2,
    seed 004; ``lesionflow.weak``). Runs inside the pseudo_label step on ``weak`` train records."""

    enabled: bool = True  # false: weak records pass through the pseudo_label step unlabelled
    n_superpixels: int = Field(64, ge=2)  # k-means clusters over [FCN features, colour, xy] ...
    compactness: float = Field(1.0, ge=0)  # ... one grid step of distance costs this much feature
    kmeans_iters: int = Field(5, ge=1)
    connectivity: Literal[4, 8] = 4  # pixel neighbourhood that makes two superpixels adjacent
    sigma: float | None = Field(None, gt=0)  # edge weight exp(-d²/σ²); null: median d per image
    gcn_hidden: int = Field(32, ge=1)
    gcn_layers: int = Field(2, ge=1)  # graph propagations
    count_by: Literal["area", "vertices"] = "area"  # n_fg from pixel area or vertex count
    default_error: float = Field(0.0, ge=0, lt=1)  # e for records without an area_error
    epochs: int = Field(4, ge=1)  # re-rank → train rounds (train.batch_size, lr, image_size)
    labelled_per_weak: float = Field(4.0, ge=0)  # labelled train records sampled per weak one
    gcn_weight: float = Field(1.0, ge=0)  # vertex loss weight next to the pixel loss
    n_logged: int = Field(4, ge=0)  # image strips of pseudo masks (ignore band shown) in MLflow


class EvaluateConfig(_Section):
    threshold: float = Field(0.5, gt=0, lt=1)
    n_overlays: int = Field(8, ge=0)


class RegistryConfig(_Section):
    """The promotion gate and the training lease (see ``registry.gate`` and ``lease``)."""

    gate_metric: Literal["dice", "iou"] = "dice"
    tolerance: float = Field(0.01, ge=0)  # overall: refuse if worse than the champion by more
    max_type_drop: float = Field(0.05, ge=0)  # per lesion type: refuse if any type drops more
    min_type_records: int = Field(3, ge=1)  # types with fewer compared records are not gated alone
    lease_seconds: float = Field(600, gt=0)  # a training run's lease expires this long after its last renewal
    lease_wait_seconds: float = Field(0, ge=0)  # a second run waits this long for the lease, then stops


class ServeConfig(_Section):
    """``lesionflow serve``: which version answers, where, and the request limits."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model: str = "champion"  # alias or version number
    max_upload_bytes: int = Field(16 * 2**20, ge=1)  # larger bodies get 413
    min_side: int = Field(8, ge=1)  # image sides outside [min_side, max_side] get 422
    max_side: int = Field(4096, ge=1)
    follow_seconds: float | None = Field(30, gt=0)  # re-resolve the alias this often; null: only /reload


class CorrectionsConfig(_Section):
    """Reviewer corrections mixed into the train split by the ingest step (see corrections.py)."""

    dataset: str | None = "latest"  # latest | a corrections dataset version (<md5>.dir) | null: none

    @field_validator("dataset")
    @classmethod
    def _latest_or_hash(cls, value: str | None) -> str | None:
        if value not in (None, "latest") and not re.fullmatch(r"[0-9a-f]{32}\.dir", value):
            raise ValueError(f"must be latest, null or a DVC directory hash (<32 hex>.dir), got {value!r}")
        return value


class ClusterConfig(_Section):
    """Kubernetes settings compiled into the pipeline (kfp-kubernetes); ignored by kfp.local."""

    credentials_secret: str | None = "lesionflow-credentials"  # Secret → env of every step
    secret_env: list[str] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    train_node_selector: dict[str, str] = {}  # e.g. {nvidia.com/gpu.present: "true"}
    train_gpus: int = Field(0, ge=0)  # GPUs requested by the training steps
    train_cpu: str | None = None  # e.g. "4": request and limit of the training steps
    train_memory: str | None = None  # e.g. "16Gi"
    artifacts_pvc: str | None = None  # mount this PVC at artifacts_mount in every step
    artifacts_mount: str = "/mnt/lesionflow"
    pipeline_root: str | None = None  # where KFP keeps step artifacts, e.g. s3://bucket/kfp (null: KFP's default)


class Params(_Section):
    """The root of ``params.yaml``."""

    seed: int = 0
    runtime: RuntimeConfig = RuntimeConfig()
    ingest: IngestConfig = IngestConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()
    weak_label: WeakLabelConfig = WeakLabelConfig()
    meta_train: MetaTrainConfig = MetaTrainConfig()
    video: VideoConfig = VideoConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    corrections: CorrectionsConfig = CorrectionsConfig()
    cluster: ClusterConfig = ClusterConfig()

    def with_section(self, section: str, **values: Any) -> Params:
        """A copy with ``values`` replacing fields of one section, e.g. ``("train", init_from="3")``
        (a run pinned to what was resolved, not what the file says)."""
        return self.model_copy(update={section: getattr(self, section).model_copy(update=values)})

    def digest(self) -> str:
        """Stable hash of the tunables (where things run doesn't change results, so runtime,
        cluster and serve are excluded)."""
        payload = self.model_dump(mode="json", exclude={"runtime", "cluster", "serve"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = ", ".join(sorted(section.model_fields)) if section else "?"
            msg = f"unknown key (allowed here: {allowed})"
        lines.append(f"  {key}: {msg}")
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
        node[leaf] = yaml.safe_load(value)
    return raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return raw


def load(paths: str | Path | list[str | Path] | None = "params.yaml",
         overrides: list[str] | None = None) -> Params:
    """Read and deep-merge params files in order (later files win, e.g. ``params.yaml`` then
    ``configs/kvasir-seg.yaml``), apply ``key=value`` overrides, validate once.
    ``paths=None`` starts from the built-in defaults."""
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
