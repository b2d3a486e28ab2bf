"""Register step: log + register the candidate with its full lineage, then gate the champion alias.

Every candidate becomes a version (refused ones too: ``challenger``), so the registry is the record
of every training attempt; only the gate moves ``champion``, and a refusal is written to the alias
history with the same gate record a promotion carries.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lesionflow import registry
from lesionflow.config import Params
from lesionflow.lineage import (
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
    TAG_PARAMS_HASH,
    TAG_PARENT_VERSION,
    TAG_PIPELINE_RUN_ID,
    TAG_REGISTRATION,
)
from lesionflow.models.store import load_model
from lesionflow.steps.evaluate import Evaluation


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
            "split": evaluation.split, "comparison": comparison}


def register(params: Params, model_dir: Path, evaluation: Evaluation, lineage: dict[str, str],
             pipeline_run_id: str) -> RegisterOutcome:
    name = params.runtime.model_name
    cfg = params.registry
    comparison = evaluation.comparison
    decision = registry.gate(evaluation.candidate.table if comparison is None else comparison.candidate,
                             comparison.champion if comparison else None, metric=cfg.gate_metric,
                             tolerance=cfg.tolerance, max_type_drop=cfg.max_type_drop,
                             min_type_records=cfg.min_type_records)
    recovered = registry.recover(name)  # under the pipeline lease: no register runs beside us
    record = gate_record(params, evaluation, decision)
    gate_tags = {TAG_GATE: record["decision"], TAG_GATE_REASON: decision.reason[:4000],
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
        decision_tags={**gate_tags, TAG_REGISTRATION: REGISTRATION_PENDING})
    registry.move_alias(name, "challenger", version, why="newest candidate", action="set")
    if decision.promote:
        registry.move_alias(name, "champion", version, why=decision.reason, action="promote",
                            gate_record=record)
    else:
        registry.record_refusal(name, version, why=decision.reason, gate_record=record)
    registry.finish_registration(name, version)
    return RegisterOutcome(version, decision.promote, decision.reason, registry.champion_version(name),
                           record, recovered)
