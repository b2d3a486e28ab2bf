"""What each KFP component body calls: decode the config, open the step's nested MLflow run,
run the step, return plain values. Components stay one-liners; the CLI and tests call the same
functions, so there is a single code path from laptop to cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow

from lesionflow import config, tracking
from lesionflow.steps import evaluate as evaluate_step
from lesionflow.steps import ingest as ingest_step
from lesionflow.steps import meta_train as meta_train_step
from lesionflow.steps import pseudo_label as pseudo_label_step
from lesionflow.steps import register as register_step
from lesionflow.steps import synthesize_video as synthesize_video_step


def ingest(params_json: str, pipeline_run_id: str, dataset_path: str) -> dict:
    params = config.from_json(params_json)
    with tracking.step_run(params, "ingest", pipeline_run_id):
        outcome = ingest_step.run(params, Path(dataset_path))
    print(outcome.report.summary())
    return {"dvc_md5": outcome.version.md5, "n_records": outcome.report.n_records,
            "remote": outcome.version.remote,
            "corrections_md5": outcome.corrections.md5 if outcome.corrections else "none"}


def synthesize_video(params_json: str, pipeline_run_id: str, dataset_path: str, out_path: str) -> dict:
    params = config.from_json(params_json)
    with tracking.step_run(params, "synthesize_video", pipeline_run_id):
        report = synthesize_video_step.synthesize_video(params, Path(dataset_path), Path(out_path))
        version = ingest_step.version_and_log(params, Path(out_path))
    return {"dvc_md5": version.md5, **report.counts}


def pseudo_label(params_json: str, pipeline_run_id: str, dataset_path: str, out_path: str) -> dict:
    params = config.from_json(params_json)
    with tracking.step_run(params, "pseudo_label", pipeline_run_id):
        report = pseudo_label_step.pseudo_label(params, Path(dataset_path), Path(out_path))
        version = ingest_step.version_and_log(params, Path(out_path))
    return {"dvc_md5": version.md5, "labeller": report.labeller or "none", **report.counts}


def meta_train(params_json: str, pipeline_run_id: str, dataset_path: str, model_path: str) -> dict:
    params = config.from_json(params_json)
    with tracking.step_run(params, "meta_train", pipeline_run_id) as run:
        outcome = meta_train_step.run(params, Path(dataset_path), Path(model_path))
    return {"mlflow_run_id": run.info.run_id, "models": sorted(outcome.results) or ["plain"]}


def evaluate(params_json: str, pipeline_run_id: str, dataset_path: str, model_path: str,
             report_path: str) -> dict:
    params = config.from_json(params_json)
    with tracking.step_run(params, "evaluate", pipeline_run_id):
        result = evaluate_step.evaluate(params, Path(dataset_path),
                                        Path(model_path), Path(report_path))
    overall = result.candidate.table["overall"]
    out = {**{k: overall[k] for k in ("dice", "iou", "hd95")}, "fps": result.candidate.fps}
    if result.champion:
        out["champion_dice"] = result.champion.overall("dice")
    # KFP metrics are protobuf numbers: an undefined HD95 (NaN) can't be sent, so it is left out
    return {k: v for k, v in out.items() if math.isfinite(v)}


def register(params_json: str, pipeline_run_id: str, model_path: str, report_path: str,
             dataset_md5: str, pseudo_dataset_md5: str, labeller: str, corrections_md5: str) -> str:
    """Returns the run summary as JSON: the pipeline's output, printed by ``lesionflow run``."""
    params = config.from_json(params_json)
    evaluation = evaluate_step.Evaluation.load(Path(report_path) / evaluate_step.REPORT_FILE)
    with tracking.step_run(params, "register", pipeline_run_id):
        outcome = register_step.register(params, Path(model_path),
                                         evaluation, dataset_md5, pipeline_run_id,
                                         pseudo_dataset_md5=pseudo_dataset_md5, labeller=labeller,
                                         corrections_md5=corrections_md5)
    tracking.finish_pipeline_run(params, pipeline_run_id)
    return json.dumps({
        "pipeline_run_id": pipeline_run_id,
        "dataset_dvc_md5": dataset_md5,
        "corrections_md5": corrections_md5,
        "model": params.runtime.model_name,
        "version": outcome.version,
        "promoted": outcome.promoted,
        "gate": outcome.reason,
        "champion": outcome.champion,
        "test_metrics": evaluation.candidate.table,
        "fps": evaluation.candidate.fps,
        "tracking_uri": mlflow.get_tracking_uri(),
    })
