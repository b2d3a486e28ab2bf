"""Register step: log + register the candidate with lineage, then gate the champion alias."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow

import lesionflow
from lesionflow import registry
from lesionflow.config import Params
from lesionflow.models.store import load_model
from lesionflow.steps.evaluate import Evaluation


@dataclass
class RegisterOutcome:
    version: str
    promoted: bool
    reason: str
    champion: str | None


def register(params: Params, model_dir: Path, evaluation: Evaluation, dataset_md5: str,
             pipeline_run_id: str, *, pseudo_dataset_md5: str, labeller: str,
             corrections_md5: str = "none") -> RegisterOutcome:
    name = params.runtime.model_name
    metric = params.registry.gate_metric
    candidate = evaluation.candidate.table["overall"]
    lineage = {
        registry.TAG_DATASET_MD5: dataset_md5,
        # the commit of the code that ran, not of whatever directory the step was started in
        registry.TAG_GIT_COMMIT: registry.git_commit(Path(lesionflow.__file__).parent),
        registry.TAG_PARAMS_HASH: params.digest(),
        registry.TAG_PIPELINE_RUN_ID: pipeline_run_id,
        registry.TAG_PARENT_VERSION: evaluation.champion_version or "none",
        registry.TAG_PSEUDO_DATASET_MD5: pseudo_dataset_md5,
        registry.TAG_LABELLER_VERSION: labeller,
        registry.TAG_CORRECTIONS_MD5: corrections_md5,
    }
    metrics = {f"{evaluation.split}_{k}": v for k, v in candidate.items() if math.isfinite(v)}
    version = registry.register_model(load_model(model_dir), name=name, lineage=lineage,
                                      metrics=metrics, threshold=params.evaluate.threshold)
    registry.move_alias(name, "challenger", version, why="newest candidate", action="set")
    decision = registry.gate(candidate, evaluation.champion.table["overall"] if evaluation.champion else None,
                             metric=metric, tolerance=params.registry.tolerance)
    if decision.promote:
        registry.move_alias(name, "champion", version, why=decision.reason, action="promote")
    mlflow.set_tags({"lesionflow.gate": "promoted" if decision.promote else "refused",
                     "lesionflow.gate_reason": decision.reason})
    return RegisterOutcome(version, decision.promote, decision.reason,
                           registry.champion_version(name))
