"""Register step: log + register the candidate with its full lineage, then gate the champion alias.

Every candidate becomes a version (refused ones too: ``challenger``), so the registry is the record
of every training attempt; only the gate moves ``champion``, and a refusal is written to the alias
history with the same gate record a promotion carries.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.lineage import (
    DATASET_TAGS,
    EVALUATION_ARTIFACT,
    GATE_ARTIFACT,
    NONE,
    PARAMS_ARTIFACT,
    RECORDS_ARTIFACT,
    RECORDS_FILE,
    REGISTRATION_PENDING,
    TAG_GATE,
    TAG_GATE_N,
    TAG_GATE_REASON,
    TAG_GATE_RECORD_SET,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_PARAMS_HASH,
    TAG_PARENT_VERSION,
    TAG_PIPELINE_RUN_ID,
    TAG_REGISTRATION,
    TAG_SERVED_PRECISION,
)
from lesionflow.models.store import load_model
from lesionflow.steps.evaluate import Evaluation

# What reviewers compare pipeline runs and versions by; the full params are an artifact.
KEY_PARAMS = ("ingest.source", "ingest.split_seed", "synthetic.seed", "seed", "model.arch",
              "model.base_channels", "model.depth", "train.image_size", "train.epochs",
              "train.batch_size", "train.lr", "train.augment", "train.scales", "train.loss",
              "train.ema_decay", "meta_train.enabled", "video.enabled", "weak_label.enabled")


def key_params(params: Params) -> dict[str, str]:
    values = params.model_dump(mode="json")
    return {key: str(reduce(lambda section, part: section[part], key.split("."), values))
            for key in KEY_PARAMS}


@dataclass
class RegisterOutcome:
    version: str
    promoted: bool
    reason: str
    champion: str | None
    gate: dict
    recovered: list[str]  # what an earlier, killed register left behind and this one repaired


def gate_record(params: Params, evaluation: Evaluation, decision: registry.GateDecision) -> dict:
    """Everything the decision rested on: both per-type tables, how many records and which."""
    cfg = params.registry
    comparison = asdict(evaluation.comparison) if evaluation.comparison else None
    return {"decision": "promoted" if decision.promote else "refused", "reason": decision.reason,
            "refusals": list(decision.refusals), "metric": cfg.gate_metric, "tolerance": cfg.tolerance,
            "max_type_drop": cfg.max_type_drop, "min_type_records": cfg.min_type_records,
            "max_temporal_drop": cfg.max_temporal_drop,
            "split": evaluation.split, "comparison": comparison}


def register(params: Params, model_dir: Path, evaluation: Evaluation, lineage: dict[str, str],
             pipeline_run_id: str, onnx_dir: Path | None = None) -> RegisterOutcome:
    """Register the candidate in ``model_dir`` with the export the evaluate step scored
    (``onnx_dir``), then let the gate move ``champion``."""
    name = params.runtime.model_name
    cfg = params.registry
    comparison = evaluation.comparison
    decision = registry.gate(evaluation.candidate.table if comparison is None else comparison.candidate,
                             comparison.champion if comparison else None, metric=cfg.gate_metric,
                             tolerance=cfg.tolerance, max_type_drop=cfg.max_type_drop,
                             min_type_records=cfg.min_type_records, max_temporal_drop=cfg.max_temporal_drop)
    recovered = registry.recover(name)  # under the pipeline lease: no register runs beside us
    record = gate_record(params, evaluation, decision)
    gate_tags = {TAG_GATE: record["decision"], TAG_GATE_REASON: decision.reason[:4000],
                 TAG_SERVED_PRECISION: evaluation.served_precision,
                 TAG_GATE_N: str(comparison.n if comparison else 0),
                 TAG_GATE_RECORD_SET: comparison.record_set if comparison else NONE}
    metrics = {f"{evaluation.split}_{k}": v for k, v in evaluation.candidate.table["overall"].items()
               if math.isfinite(v)}
    version = registry.register_model(
        load_model(model_dir), name=name, metrics=metrics, threshold=params.evaluate.threshold,
        lineage={**lineage, TAG_PARAMS_HASH: params.digest(), TAG_PIPELINE_RUN_ID: pipeline_run_id,
                 TAG_PARENT_VERSION: evaluation.champion_version or NONE},
        artifacts={PARAMS_ARTIFACT: params.model_dump(mode="json"),
                   RECORDS_ARTIFACT: json.loads((model_dir / RECORDS_FILE).read_text()),
                   EVALUATION_ARTIFACT: {"split": evaluation.split, "table": evaluation.candidate.table},
                   GATE_ARTIFACT: record},
        decision_tags={**gate_tags, TAG_REGISTRATION: REGISTRATION_PENDING}, key_params=key_params(params),
        onnx_dir=onnx_dir if onnx_dir is not None and onnx_dir.is_dir() else None)
    registry.move_alias(name, "challenger", version, why="newest candidate", action="set")
    if decision.promote:
        registry.move_alias(name, "champion", version, why=decision.reason, action="promote",
                            gate_record=record)
    else:
        registry.record_refusal(name, version, why=decision.reason, gate_record=record)
    tags = registry.version_info(name, version)["tags"]
    registry.describe_version(name, version, version_description(params, evaluation, record, tags))
    registry.finish_registration(name, version)
    return RegisterOutcome(version, decision.promote, decision.reason, registry.champion_version(name),
                           record, recovered)


def metrics_table(table: dict[str, dict[str, float]]) -> str:
    """A per-type metrics table in markdown (the MLflow UI renders descriptions as markdown)."""
    lines = ["| lesion type | n | Dice | IoU | HD95 |", "|---|---|---|---|---|"]
    for lesion_type, row in table.items():
        lines.append(f"| {lesion_type} | {int(row['n'])} | {row['dice']:.4f} | {row['iou']:.4f} | "
                     f"{row['hd95']:.2f} |")
    return "\n".join(lines)


def version_description(params: Params, evaluation: Evaluation, record: dict, tags: dict[str, str]) -> str:
    """The version page's description: the gate decision and why, the test table, the datasets
    and code it came from, the key params, and links to its alias history and pipeline run."""
    name = params.runtime.model_name
    compared = record["comparison"]
    against = (f" (against champion v{compared['champion_version']} on {compared['n']} test records "
               f"unseen by both, record set `{compared['record_set']}`)" if compared else "")
    datasets = ", ".join(f"{role.replace('_', ' ')} `{tags[tag]}`" for role, tag in DATASET_TAGS.items()
                         if tags.get(tag, NONE) != NONE)
    history = registry.history_experiment_id(name)
    return "\n\n".join([
        f"**Gate: {record['decision']}**{against}: {record['reason']}",
        f"Test split ({evaluation.split}), {evaluation.candidate.fps:.1f} frames/s, served in "
        f"{evaluation.served_precision}:\n\n"
        + metrics_table(evaluation.candidate.table),
        f"Data (DVC): {datasets}. Code `{tags[TAG_GIT_COMMIT]}`"
        + (" (uncommitted changes)" if tags.get(TAG_GIT_DIRTY) == "true" else "")
        + f". Parent version: {tags.get(TAG_PARENT_VERSION, NONE)}.",
        "Key params: " + ", ".join(f"`{k}={v}`" for k, v in key_params(params).items()),
        f"[Alias history of {name}](#/experiments/{history}) · gate record: `{GATE_ARTIFACT}` on the "
        "source run",
    ])


def pipeline_summary(params: Params, outcome: RegisterOutcome, evaluation: Evaluation,
                     lineage: dict[str, str]) -> dict:
    """What the pipeline's parent run shows: name, description, key params, per-type metrics."""
    from lesionflow.tracking import dataset_label

    overall = evaluation.candidate.table["overall"]
    name = params.runtime.model_name
    decision = "promoted" if outcome.promoted else "refused"
    metrics = {f"test_{k}" if lesion_type == "overall" else f"test_{lesion_type}_{k}": v
               for lesion_type, row in evaluation.candidate.table.items() for k, v in row.items()
               if k != "n" and math.isfinite(v)}
    return {
        "name": f"{dataset_label(params)} · Dice {overall['dice']:.3f} · {decision} v{outcome.version}",
        "description": "\n\n".join([
            f"[{name} v{outcome.version}](#/models/{name}/versions/{outcome.version}), **{decision}**: "
            f"{outcome.reason}. Champion now: v{outcome.champion or NONE}.",
            metrics_table(evaluation.candidate.table),
            "Each step is a child run; the dataset versions are in the Datasets column.",
        ]),
        "key_params": key_params(params),
        "metrics": {**metrics, "fps": evaluation.candidate.fps, "promoted": float(outcome.promoted)},
        "datasets": {role: lineage[tag] for role, tag in DATASET_TAGS.items() if lineage.get(tag, NONE) != NONE},
    }
