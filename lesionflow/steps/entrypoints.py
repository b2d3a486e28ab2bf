"""What each KFP component body calls. Every step has the same contract:

    step(params_json, pipeline_run_id, lineage_json, <input paths>, <output paths>) -> dict

``step_context`` decodes the config, takes the model's pipeline lease and opens the step's nested
MLflow run; a step that writes a dataset DVC-versions it (``version_and_log``); every step returns
plain values and the lineage it received plus what it produced (``lineage.merged``), which the
register step puts on the version.
Components stay one-liners; the CLI and tests call the same functions, so there is a single code
path from laptop to cluster.

Each step runs in its own process, so its start-up is paid six times a pipeline run: a step imports
only its own module (ingest never loads torch), and nothing heavy is imported here at module level
(``run_local`` imports this module for two constants).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lesionflow import config, lineage, skip_exit_gc, timing
from lesionflow.config import Params
from lesionflow.errors import LesionflowError, TrackingUnavailableError

PIPELINE_LEASE = "pipeline"  # one training pipeline run per model at a time, ingest → register
# Set by ``run_local``: the file a failing step writes its named error to, because kfp.local itself
# only says which task failed (the steps are subprocesses). Unset on a cluster: nothing is written.
ERROR_REPORT_ENV = "LESIONFLOW_STEP_ERROR_FILE"


@contextmanager
def reported(step: str) -> Iterator[None]:
    """Pass a step's ``LesionflowError`` on to ``run_local`` (class, message, step), re-raised."""
    try:
        yield
    except LesionflowError as err:
        if target := os.environ.get(ERROR_REPORT_ENV):
            Path(target).write_text(json.dumps({"step": step, "type": type(err).__name__,
                                                "message": str(err)}))
        raise


@contextmanager
def step_context(params_json: str, step: str, pipeline_run_id: str) -> Iterator[Params]:
    """Params, the lease and the step's MLflow run. The lease is held by the pipeline run from its
    first step to the end of register (re-entrant across the steps' processes and pods, renewed
    while a step runs), released when a step fails (the run is over), and expires if the run is
    killed: two runs never train, register and move ``champion`` for one model at the same time."""
    from lesionflow import lease, services, tracking

    timing.begin(step)  # the step's imports are done
    skip_exit_gc()  # the process ends with the step
    with reported(step):
        params = config.from_json(params_json)
        cfg = params.registry
        tracking.connect(params)  # the lease lives on the tracking server
        timing.mark("mlflow connect")
        with lease.held(params.runtime.model_name, PIPELINE_LEASE, pipeline_run_id,
                        ttl=cfg.lease_seconds, wait=cfg.lease_wait_seconds,
                        release=step == "register") as held:
            timing.mark("lease acquire")
            if held.took_over:  # their runs were killed mid-step: say so in the UI
                tracking.end_runs_of_dead_pipelines(params, held.took_over)
            try:
                with tracking.step_run(params, step, pipeline_run_id):
                    timing.mark("run start")
                    yield params
                    timing.mark("compute")
                timing.mark("run end")
            except BaseException as err:
                with suppress(Exception):  # an outage may be why the step failed
                    held.release()
                uri = params.runtime.tracking_uri()
                if not isinstance(err, LesionflowError) and (problem := services.tracking_problem(uri)):
                    raise TrackingUnavailableError(services.tracking_unavailable_message(
                        uri, problem, params.runtime.service_wait_seconds)) from err
                raise
        timing.mark("lease release")


def ingest(params_json: str, pipeline_run_id: str, lineage_json: str, dataset_path: str) -> dict:
    from lesionflow.steps import ingest as ingest_step

    with step_context(params_json, "ingest", pipeline_run_id) as params:
        outcome = ingest_step.run(params, Path(dataset_path))
    print(outcome.report.summary())
    corrections_md5 = outcome.corrections.md5 if outcome.corrections else None
    return {"dvc_md5": outcome.version.md5, "n_records": outcome.report.n_records,
            "remote": outcome.version.remote,
            "lineage": lineage.merged(lineage_json, dataset_md5=outcome.version.md5,
                                      corrections_md5=corrections_md5)}


def synthesize_video(params_json: str, pipeline_run_id: str, lineage_json: str, dataset_path: str,
                     out_path: str) -> dict:
    from lesionflow.steps import ingest as ingest_step
    from lesionflow.steps import synthesize_video as synthesize_video_step

    with step_context(params_json, "synthesize_video", pipeline_run_id) as params:
        report = synthesize_video_step.synthesize_video(params, Path(dataset_path), Path(out_path))
        version = ingest_step.version_and_log(params, Path(out_path), role="augmented")
    return {"dvc_md5": version.md5, **report.counts,
            "lineage": lineage.merged(lineage_json, augmented_dataset_md5=version.md5,
                                      video_model=report.model_uri)}


def pseudo_label(params_json: str, pipeline_run_id: str, lineage_json: str, dataset_path: str,
                 out_path: str) -> dict:
    from lesionflow.steps import ingest as ingest_step
    from lesionflow.steps import pseudo_label as pseudo_label_step

    with step_context(params_json, "pseudo_label", pipeline_run_id) as params:
        report = pseudo_label_step.pseudo_label(params, Path(dataset_path), Path(out_path))
        version = ingest_step.version_and_log(params, Path(out_path), role="trained_on")
    return {"dvc_md5": version.md5, "labeller": report.labeller or lineage.NONE, **report.counts,
            "lineage": lineage.merged(lineage_json, pseudo_dataset_md5=version.md5,
                                      labeller_version=report.labeller, weak_model=report.weak_model)}


def meta_train(params_json: str, pipeline_run_id: str, lineage_json: str, dataset_path: str,
               model_path: str) -> dict:
    import mlflow

    from lesionflow import tracking
    from lesionflow.steps import meta_train as meta_train_step
    from lesionflow.steps.train import init_version

    with step_context(params_json, "meta_train", pipeline_run_id) as params:
        run_id = mlflow.active_run().info.run_id
        tracking.log_dataset_input(params, json.loads(lineage_json)[lineage.TAG_PSEUDO_DATASET_MD5],
                                   "trained_on", context="training")
        warm_from = init_version(params)  # resolved once: the weights loaded = the version recorded
        outcome = meta_train_step.run(params.with_section("train", init_from=warm_from),
                                      Path(dataset_path), Path(model_path))
    return {"mlflow_run_id": run_id, "models": sorted(outcome.results) or ["plain"],
            "lineage": lineage.merged(lineage_json, init_from_version=warm_from,
                                      trained_epochs=outcome.budget_epochs,
                                      trained_precision=outcome.precision)}


def evaluate(params_json: str, pipeline_run_id: str, lineage_json: str, dataset_path: str,
             model_path: str, report_path: str) -> dict:
    from lesionflow import tracking
    from lesionflow.steps import evaluate as evaluate_step

    with step_context(params_json, "evaluate", pipeline_run_id) as params:
        tracking.log_dataset_input(params, json.loads(lineage_json)[lineage.TAG_DATASET_MD5],
                                   "ingested", context="testing")
        result = evaluate_step.evaluate(params, Path(dataset_path), Path(model_path), Path(report_path))
    out = {**{k: result.candidate.table["overall"][k] for k in ("dice", "iou", "hd95")},
           "fps": result.candidate.fps}
    if result.comparison:
        out["champion_dice"] = result.comparison.champion["overall"]["dice"]
        out["compared_n"] = result.comparison.n
    # KFP metrics are protobuf numbers: an undefined value (NaN) can't be sent, so it is left out
    return {k: v for k, v in out.items() if math.isfinite(v)}


def register(params_json: str, pipeline_run_id: str, lineage_json: str, model_path: str,
             report_path: str) -> str:
    """Returns the run summary as JSON: the pipeline's output, printed by ``lesionflow run``."""
    import mlflow

    from lesionflow import tracking
    from lesionflow.models import runtime
    from lesionflow.steps import evaluate as evaluate_step
    from lesionflow.steps import register as register_step

    evaluation = evaluate_step.Evaluation.load(Path(report_path) / evaluate_step.REPORT_FILE)
    with step_context(params_json, "register", pipeline_run_id) as params:
        used = json.loads(lineage_json)
        outcome = register_step.register(params, Path(model_path), evaluation, used, pipeline_run_id,
                                         onnx_dir=Path(report_path) / runtime.ONNX)
    tracking.summarize_pipeline_run(params, pipeline_run_id,
                                    **register_step.pipeline_summary(params, outcome, evaluation, used))
    return json.dumps({
        "pipeline_run_id": pipeline_run_id,
        "dataset_dvc_md5": used[lineage.TAG_DATASET_MD5],
        "corrections_md5": used[lineage.TAG_CORRECTIONS_MD5],
        "model": params.runtime.model_name,
        "version": outcome.version,
        "promoted": outcome.promoted,
        "gate": outcome.reason,
        "compared": outcome.gate["comparison"],
        "champion": outcome.champion,
        "test_metrics": evaluation.candidate.table,
        # what the test metrics are of, when the wall-time budget ended training early
        "trained_epochs": used[lineage.TAG_TRAINED_EPOCHS],
        "trained_precision": used[lineage.TAG_TRAINED_PRECISION],
        "fps": evaluation.candidate.fps,
        "served": evaluation.served_precision,  # what the frames/s are of
        "tracking_uri": mlflow.get_tracking_uri(),
        "recovered": outcome.recovered,
    })
