"""MLflow runs: one parent run per pipeline run, one nested child run per step.

KFP runs each step in its own process (and pod), so there is no shared Python object to hold the
parent run; the parent is found by its ``lesionflow.pipeline_run_id`` tag or created by the first
step that needs it. Reviewers then see each pipeline run as one expandable row in the MLflow UI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow.tracking import MlflowClient

from lesionflow import lineage
from lesionflow.config import Params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def connect(params: Params) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    With the embedded SQLite store, artifacts go under the workdir rather than ``./mlruns`` of
    whatever directory the step happens to run in."""
    uri = params.runtime.tracking_uri()
    if uri.startswith("sqlite:///"):
        params.runtime.resolved_workdir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # the registry lives in the same store; never a stale one
    experiment_id = ensure_experiment(params, params.runtime.experiment)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ensure_experiment(params: Params, name: str) -> str:
    """Id of experiment ``name``, created if needed (with the embedded store, artifacts under the
    workdir rather than ``./mlruns`` of the current directory)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if params.runtime.tracking_uri().startswith("sqlite:///"):
        location = (params.runtime.resolved_workdir() / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=location)
    return client.create_experiment(name)


def parent_run_id(params: Params, pipeline_run_id: str) -> str:
    experiment_id = connect(params)
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{lineage.TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' "
                                       f"and tags.`{lineage.TAG_STEP}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {pipeline_run_id}",
                            tags={lineage.TAG_PIPELINE_RUN_ID: pipeline_run_id, lineage.TAG_STEP: "pipeline",
                                  lineage.TAG_PARAMS_HASH: params.digest()})
    return run.info.run_id


@contextmanager
def step_run(params: Params, step: str, pipeline_run_id: str) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one step of one pipeline run (ended FAILED if the step raises)."""
    parent = parent_run_id(params, pipeline_run_id)
    with mlflow.start_run(run_name=step, parent_run_id=parent,
                          tags={lineage.TAG_PIPELINE_RUN_ID: pipeline_run_id, lineage.TAG_STEP: step}) as run:
        yield run


def finish_pipeline_run(params: Params, pipeline_run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(parent_run_id(params, pipeline_run_id), status=status)
