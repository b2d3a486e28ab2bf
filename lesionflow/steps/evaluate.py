"""Evaluate step: the candidate on the held-out split, and candidate vs the current champion on
the records of that split that neither model trained or selected on (the gate's fair ground).

Metrics are measured at each image's own (canonical) resolution, not at the model's input size,
so numbers stay comparable between models trained at different resolutions. Both models answer
through the runtime a registered version serves through (``models/runtime.py``: ONNX Runtime,
torch without it), so the metrics and frames/s are those of what will be served: the candidate's
export is made here (``export_for_serving``: int8 where validation allows) and register stores it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.data.manifest import Record, read_manifest
from lesionflow.data.transforms import load_image, load_mask
from lesionflow.errors import EmptySplitError, GateError, RegistryError
from lesionflow.lineage import (
    RECORDS_ARTIFACT,
    RECORDS_FILE,
    TAG_COMPARED_WITH,
    TAG_GATE_RECORD_SET,
)
from lesionflow.metrics import aggregate, dice, image_metrics
from lesionflow.models import runtime
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model
from lesionflow.training import labelled

REPORT_FILE = "evaluation.json"


@dataclass
class ModelScore:
    table: dict[str, dict[str, float]]
    fps: float
    rows: list[dict] = field(default_factory=list)  # per image: id, lesion_type, metrics

    def overall(self, metric: str) -> float:
        return self.table["overall"][metric]

    def subset(self, ids: set[str]) -> dict[str, dict[str, float]]:
        """The per-type table over the images ``ids`` only."""
        return aggregate([row for row in self.rows if row["id"] in ids])


@dataclass
class Comparison:
    """Candidate and champion on the same test records, none of which either trained or selected
    on: what the gate decides on."""

    champion_version: str
    n: int
    record_set: str  # hash of the compared records' ids and content
    excluded: dict[str, int]  # test records left out: seen by the champion / by the candidate
    champion_records_known: bool  # False: the champion was registered without its record list
    candidate: dict[str, dict[str, float]]
    champion: dict[str, dict[str, float]]


@dataclass
class Evaluation:
    split: str
    candidate: ModelScore  # the whole split: the version's own test metrics
    comparison: Comparison | None  # None: no champion yet
    export: list[dict] = field(default_factory=list)  # per graph: precision served and why

    @property
    def champion_version(self) -> str | None:
        return self.comparison.champion_version if self.comparison else None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Evaluation:
        raw = json.loads(path.read_text())
        comparison = Comparison(**raw["comparison"]) if raw["comparison"] else None
        return cls(raw["split"], ModelScore(**raw["candidate"]), comparison, raw.get("export", []))

    @property
    def served_precision(self) -> str:
        """"int8", "float32", "lesion type: precision, …" for a router, or "torch" (no export)."""
        if not self.export:
            return "torch"
        if len(self.export) == 1:
            return self.export[0]["precision"]
        return ", ".join(f"{g['lesion_type']}: {g['precision']}" for g in self.export)


def score_model(model, dataset_dir: Path, records: list[Record], threshold: float) -> ModelScore:
    """Per-image metrics of ``model`` (anything with ``predict_proba``: a ``Segmenter``, a router
    or their ``runtime.predictor``; HD95 in mm where the record's pixel spacing is known)
    aggregated per lesion type; frames/s measured one frame at a time, as a real-time video stream
    would arrive: the prediction with its pre- and post-processing (resize, normalise, network,
    resize back, threshold), not the decoding from disk or the scoring, which serving does not do
    (they took 45 % of this loop on a 2-core CPU, so counting them nearly halved the reported rate).

    Video frames (``frame_index`` set) are scored in frame order per video, each row carrying the
    Dice of its predicted and true mask with the previous scored frame's, so the temporal
    consistency needs only the previous frame's masks in memory, not the whole video."""
    rows = []
    # stills keep their order; video frames follow, sorted, so each one's predecessor comes first
    ordered = sorted(records, key=lambda r: (r.frame_index is not None, r.group if r.frame_index is not None
                                             else "", r.frame_index or 0))
    previous: tuple[str, str, np.ndarray, np.ndarray] | None = None  # group, id, pred, truth
    predicting = 0.0
    for record in ordered:
        image = load_image(dataset_dir, record)
        start = time.perf_counter()
        pred = model.predict_proba([image], lesion_types=[record.lesion_type])[0] > threshold
        predicting += time.perf_counter() - start
        truth = load_mask(dataset_dir, record).astype(bool)
        row = {**image_metrics(pred, truth, record.spacing), "id": record.id,
               "lesion_type": record.lesion_type}
        if record.frame_index is not None:
            row["sequence"] = record.group
            if previous is not None and previous[0] == record.group:
                row.update(prev_id=previous[1], temporal_pred=dice(pred, previous[2]),
                           temporal_truth=dice(truth, previous[3]))
            previous = (record.group, record.id, pred, truth)
        rows.append(row)
    return ModelScore(aggregate(rows), len(records) / predicting, rows)


def record_set_hash(records: list[Record]) -> str:
    lines = sorted(f"{r.id}:{r.image_sha256}:{r.mask_sha256}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def unseen(records: list[Record], seen: list[dict]) -> list[Record]:
    """``records`` whose id and image content are both absent from ``seen`` (rows of a model's
    ``records.json``): a renamed copy of a training image counts as seen."""
    ids = {row["id"] for row in seen}
    images = {row["image_sha256"] for row in seen}
    return [r for r in records if r.id not in ids and r.image_sha256 not in images]


def compare_with_champion(params: Params, dataset_dir: Path, records: list[Record], model_dir: Path,
                          candidate: ModelScore) -> Comparison | None:
    """Score the champion on the test records neither model has seen (the champion's record list
    is stored at its registration; the candidate's lies next to its weights)."""
    name = params.runtime.model_name
    version = registry.champion_version(name)
    if version is None:
        return None
    champion_seen = registry.version_artifact(name, version, RECORDS_ARTIFACT)
    candidate_seen = json.loads((model_dir / RECORDS_FILE).read_text())
    not_champion = records if champion_seen is None else unseen(records, champion_seen)
    compared = unseen(not_champion, candidate_seen)
    if not compared:
        raise GateError(f"none of the {len(records)} test records is unseen by both the candidate and "
                        f"champion v{version}: there is nothing fair to compare on (was the champion "
                        "trained on this dataset's test split?)")
    try:
        champion_model = registry.load_pyfunc(name, version).predictor
    except RegistryError as err:
        raise RegistryError(f"champion v{version} could not be loaded for comparison: {err}") from err
    champion = score_model(champion_model, dataset_dir, compared, params.evaluate.threshold)
    champion_table = aggregate(same_pairs(champion.rows, candidate.rows))
    return Comparison(
        champion_version=version, n=len(compared), record_set=record_set_hash(compared),
        excluded={"seen_by_champion": len(records) - len(not_champion),
                  "seen_by_candidate": len(not_champion) - len(compared)},
        champion_records_known=champion_seen is not None,
        candidate=candidate.subset({r.id for r in compared}), champion=champion_table)


PAIR_KEYS = ("prev_id", "temporal_pred", "temporal_truth")


def same_pairs(rows: list[dict], reference: list[dict]) -> list[dict]:
    """``rows`` without the consecutive-frame pairs ``reference`` lacks: the candidate, scored on
    the whole split, has no pair across a frame left out of the comparison, while the champion,
    scored on the compared records only, would; both temporal_dice figures must rest on the same
    pairs."""
    prev = {row["id"]: row.get("prev_id") for row in reference}
    return [row if row.get("prev_id") == prev.get(row["id"]) else
            {k: v for k, v in row.items() if k not in PAIR_KEYS} for row in rows]


OVERLAY_HEIGHT = 256  # px per panel: smaller strips are unreadable in the MLflow artifact view


def log_overlays(model, dataset_dir: Path, records: list[Record], score: ModelScore, n: int,
                 threshold: float) -> None:
    """The ``n`` worst test images (lowest Dice first) as labelled overlay strips, named so the
    artifact browser lists them worst first: where a reviewer should look."""
    by_id = {r.id: r for r in records}
    # an undefined Dice (no lesion in truth or prediction) is not a failure to look at first
    worst = sorted(score.rows, key=lambda row: (row["dice"] if math.isfinite(row["dice"]) else 2.0,
                                                 row["id"]))[:n]
    for rank, row in enumerate(worst, start=1):
        record = by_id[row["id"]]
        image = load_image(dataset_dir, record)
        pred = model.predict_proba([image], lesion_types=[record.lesion_type])[0] > threshold
        label = f"#{rank} worst · {record.lesion_type} · Dice {row['dice']:.3f} · {record.id}"
        mlflow.log_image(overlay_strip(image, load_mask(dataset_dir, record), pred, label),
                         f"overlays/{rank:03d}_dice{row['dice']:.3f}_{record.id.replace('/', '_')}.png")


def overlay_strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, label: str = "") -> np.ndarray:
    """Image | truth (green) | prediction (red), each panel at least ``OVERLAY_HEIGHT`` px high,
    under a caption line, for reviewers in the MLflow UI."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(
        image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)

    def tint(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        out = rgb.astype(np.float32)
        out[mask] = 0.55 * out[mask] + 0.45 * np.array(colour, dtype=np.float32)
        return out.astype(np.uint8)

    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    strip = Image.fromarray(np.concatenate([rgb, gap, tint(truth, (0, 255, 0)), gap, tint(pred, (255, 0, 0))],
                                           axis=1))
    if strip.height < OVERLAY_HEIGHT:
        strip = strip.resize((round(strip.width * OVERLAY_HEIGHT / strip.height), OVERLAY_HEIGHT),
                             Image.Resampling.BILINEAR)
    font = ImageFont.load_default(size=18)
    caption = 28
    canvas = Image.new("RGB", (strip.width, strip.height + caption), "white")
    canvas.paste(strip, (0, caption))
    ImageDraw.Draw(canvas).text((6, 4), f"{label}   image | truth (green) | prediction (red)".strip(),
                                fill="black", font=font)
    return np.asarray(canvas)


def calibration_batch(model: Segmenter, dataset_dir: Path, train: list[Record], n: int) -> np.ndarray:
    """``n`` train images spread evenly over the split, as ``model`` takes them: int8's calibration."""
    return np.stack([model.prepare(load_image(dataset_dir, r)) for r in train[::max(1, len(train) // n)][:n]])


def export_for_serving(params: Params, model: Segmenter | LesionTypeRouter, dataset_dir: Path,
                       records: list[Record], onnx_dir: Path) -> list[dict]:
    """Write into ``onnx_dir`` the ONNX export registration will store and serve, and say per graph
    which precision it holds: the float graph, or — with ``evaluate.int8`` — its int8 twin
    (``runtime.quantize_int8``, calibrated on train images of the graph's lesion type) where the
    validation split shows it loses at most ``evaluate.int8_max_dice_drop`` Dice. The test split is
    not looked at: it still has to score the choice."""
    cfg = params.evaluate
    runtime.save(model, onnx_dir)
    decisions = []
    for lesion_type, path in runtime.graph_files(onnx_dir).items():
        segmenter = model if lesion_type is None else model.route(lesion_type)
        of_type = [r for r in records if lesion_type is None or r.lesion_type == lesion_type]
        train, val = labelled(of_type, "train"), labelled(of_type, "val")
        decision = {"lesion_type": lesion_type or "all", "precision": "float32"}
        decisions.append(decision)
        if not cfg.int8:
            decision["reason"] = "evaluate.int8 is off"
            continue
        if not train or not val:
            decision["reason"] = "no train and validation images of this type to calibrate and check int8 on"
            continue
        calibration = calibration_batch(segmenter, dataset_dir, train, cfg.int8_calibration_images)
        graphs = {"float32": path.read_bytes()}
        graphs["int8"] = runtime.quantize_int8(graphs["float32"], calibration)
        val_dice = {precision: score_model(runtime.OnnxSegmenter(graph, segmenter), dataset_dir, val,
                                           cfg.threshold).overall("dice")
                    for precision, graph in graphs.items()}
        drop = val_dice["float32"] - val_dice["int8"]
        keep = drop <= cfg.int8_max_dice_drop
        if keep:
            path.write_bytes(graphs["int8"])
        decision.update(precision="int8" if keep else "float32", val_dice_float32=val_dice["float32"],
                        val_dice_int8=val_dice["int8"], n_val=len(val), n_calibration=len(calibration),
                        reason=f"int8 validation Dice {val_dice['int8']:.4f} vs float {val_dice['float32']:.4f} "
                               f"({'within' if keep else 'beyond'} evaluate.int8_max_dice_drop "
                               f"{cfg.int8_max_dice_drop:g})")
        print(f"export{'' if lesion_type is None else ' (' + lesion_type + ')'}: {decision['precision']}: "
              f"{decision['reason']}")
    return decisions


def served_predictor(params: Params, model: Segmenter | LesionTypeRouter, dataset_dir: Path,
                     records: list[Record], onnx_dir: Path) -> tuple[object, list[dict]]:
    """What will answer for ``model`` once registered — its export (``export_for_serving``, into
    ``onnx_dir``) through ONNX Runtime, or torch where onnxruntime is absent — and the export's
    per-graph decisions ([] without an export)."""
    export = export_for_serving(params, model, dataset_dir, records, onnx_dir) if runtime.available() else []
    return runtime.predictor(model, onnx_dir if export else None), export


def select(records: list[Record], split: str) -> list[Record]:
    """Labelled records of one split, or of every split with ``split="all"`` (cross-dataset use);
    none is an ``EmptySplitError``: there is nothing to score."""
    if split == "all":
        chosen = [r for s in ("train", "val", "test") for r in labelled(records, s)]
    else:
        chosen = labelled(records, split)
    if not chosen:
        where = "at all" if split == "all" else f"in its {split!r} split"
        fix = ("" if split == "all" else f"give ingest.split.{split} a share > 0 (or more groups), "
               "or ")
        raise EmptySplitError(f"the dataset has no labelled records {where}: {fix}add labelled images")
    return chosen


def evaluate(params: Params, dataset_dir: Path, model_dir: Path, out_dir: Path,
             split: str = "test") -> Evaluation:
    """Score the candidate on ``split``, and candidate and champion (if any) on the records of
    it that neither has seen; log tables and overlays."""
    manifest = read_manifest(dataset_dir)
    records = select(manifest, split)
    cfg = params.evaluate
    model, export = served_predictor(params, load_model(model_dir), dataset_dir, manifest, out_dir / runtime.ONNX)
    if export:
        mlflow.log_dict({"graphs": export}, "export.json")
    candidate = score_model(model, dataset_dir, records, cfg.threshold)
    log_overlays(model, dataset_dir, records, candidate, cfg.n_overlays, cfg.threshold)
    result = Evaluation(split, candidate, compare_with_champion(params, dataset_dir, records, model_dir,
                                                                candidate), export)
    for name, row in candidate.table.items():
        mlflow.log_metrics({f"{split}.{name}.{k}": v for k, v in row.items() if np.isfinite(v)})
    mlflow.log_metric("fps", candidate.fps)
    mlflow.log_params({"fps_runtime": runtime.runtime_name(model), "served_precision": result.served_precision})
    mlflow.log_table(_columns(candidate.table), "per_type_metrics.json")
    if result.comparison is not None:
        c = result.comparison
        mlflow.log_metrics({f"compared.{who}.{k}": v for who, table in
                            (("candidate", c.candidate), ("champion", c.champion))
                            for k, v in table["overall"].items() if np.isfinite(v)})
        mlflow.log_metric("compared.n", c.n)
        mlflow.set_tags({TAG_COMPARED_WITH: c.champion_version, TAG_GATE_RECORD_SET: c.record_set})
        print(f"compared with champion v{c.champion_version} on {c.n} {split} records neither has "
              f"seen ({c.excluded['seen_by_champion']} left out: the champion trained or selected on them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    result.save(out_dir / REPORT_FILE)
    mlflow.log_artifact(str(out_dir / REPORT_FILE))
    return result


def _columns(table: dict[str, dict[str, float]]) -> dict[str, list]:
    """A per-type table as columns, for ``mlflow.log_table``."""
    keys = list(table["overall"])
    return {"lesion_type": list(table), **{k: [row[k] for row in table.values()] for k in keys}}
