"""MLflow runs: one parent run per pipeline run, one nested child run per step.

KFP runs each step in its own process (and pod), so there is no shared Python object to hold the
parent run; the parent is found by its ``lesionflow.pipeline_run_id`` tag or created by the first
step that needs it. Reviewers then see each pipeline run as one expandable row in the MLflow UI.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote

import mlflow
from mlflow.tracking import MlflowClient

from lesionflow import lineage, services
from lesionflow.config import Params

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
services.bound_mlflow_http_retries()


def connect(params: Params) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id.

    With the embedded SQLite store, artifacts go under the workdir rather than ``./mlruns`` of
    whatever directory the step happens to run in."""
    uri = params.runtime.tracking_uri()
    if uri.startswith("sqlite:///"):
        params.runtime.resolved_workdir().mkdir(parents=True, exist_ok=True)
    services.wait_for_tracking(uri, params.runtime.service_wait_seconds)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # the registry lives in the same store; never a stale one
    main_experiment = experiment_id(params.runtime.experiment)
    mlflow.set_experiment(experiment_id=main_experiment)
    return main_experiment


def experiment_id(name: str, tags: dict[str, str] | None = None) -> str:
    """Id of experiment ``name`` in the current store, created if needed. With a ``sqlite:///``
    store, artifacts go next to the database file, never to ``./mlruns`` of the current folder
    (MLflow's default for experiments created without a location)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # a model-training experiment: the UI would otherwise open it on an empty GenAI traces page
    return client.create_experiment(name, artifact_location=_local_artifact_location(),
                                    tags={"mlflow.experimentKind": "custom_model_development", **(tags or {})})


def _local_artifact_location() -> str | None:
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts live
    return (Path(unquote(uri[len("sqlite:///"):])).resolve().parent / "mlartifacts").as_uri()


def parent_run_id(params: Params, pipeline_run_id: str) -> str:
    """The pipeline run's parent MLflow run (call after ``connect``)."""
    experiment = experiment_id(params.runtime.experiment)
    client = MlflowClient()
    found = client.search_runs(
        [experiment], filter_string=f"tags.`{lineage.TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' "
                                       f"and tags.`{lineage.TAG_STEP}` = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    # renamed by ``summarize_pipeline_run`` once the gate has decided
    run = client.create_run(experiment, run_name=f"{dataset_label(params)} · running {pipeline_run_id[:8]}",
                            tags={lineage.TAG_PIPELINE_RUN_ID: pipeline_run_id, lineage.TAG_STEP: "pipeline",
                                  lineage.TAG_PARAMS_HASH: params.digest()})
    return run.info.run_id


@contextmanager
def step_run(params: Params, step: str, pipeline_run_id: str) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one step of one pipeline run (ended FAILED if the step raises)."""
    parent = parent_run_id(params, pipeline_run_id)
    # the meta_train step trains plainly when meta-training is off: name the run for what it did
    run_name = "train" if step == "meta_train" and not params.meta_train.enabled else step
    with mlflow.start_run(run_name=run_name, parent_run_id=parent,
                          tags={lineage.TAG_PIPELINE_RUN_ID: pipeline_run_id, lineage.TAG_STEP: step}) as run:
        yield run


def dataset_label(params: Params) -> str:
    """What reviewers call the data: the source folder's name (``kvasir-seg``), or ``synthetic``."""
    return Path(params.ingest.source.rstrip("/")).name or params.ingest.source


def dataset_input(params: Params, md5: str, role: str, context: str):
    """A DVC dataset version (``role``: ingested, augmented, trained_on) as an MLflow dataset input
    used as ``context``, so the UI's Datasets column names it: the digest is the DVC hash, the
    source is the object DVC stores it as on the remote."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    remote = params.runtime.remote().rstrip("/")
    with warnings.catch_warnings():  # MLflow registers its local-artifact source twice and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
        source = resolve_dataset_source(f"{remote}/files/md5/{md5[:2]}/{md5[2:]}")
    dataset = MetaDataset(source, name=f"{dataset_label(params)} ({role})", digest=md5)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def log_dataset_input(params: Params, md5: str, role: str, context: str) -> None:
    """``dataset_input`` on the active run."""
    MlflowClient().log_inputs(mlflow.active_run().info.run_id,
                              datasets=[dataset_input(params, md5, role, context)])


def summarize_pipeline_run(params: Params, pipeline_run_id: str, *, name: str, description: str,
                           key_params: dict[str, object], metrics: dict[str, float],
                           datasets: dict[str, str]) -> None:
    """Give the pipeline's parent run what reviewers compare pipelines by (the children hold the
    detail): a telling name, a description, the key params, the headline metrics and its dataset
    versions (role → DVC hash); then end it. Logging the same values again (a re-run register
    step) is a no-op for MLflow."""
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    run_id = parent_run_id(params, pipeline_run_id)
    client.log_inputs(run_id, datasets=[dataset_input(params, md5, role, role) for role, md5 in datasets.items()])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in key_params.items()],
                     tags=[RunTag("mlflow.note.content", description)])
    client.update_run(run_id, name=name)
    client.set_terminated(run_id, status="FINISHED")


def end_runs_of_dead_pipelines(params: Params, pipeline_run_ids: list[str]) -> None:
    """Mark the still-RUNNING runs of pipeline runs that died (their lease was taken over) KILLED,
    so the MLflow UI does not show them running forever."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(params.runtime.experiment)
    for pipeline_run_id in pipeline_run_ids:
        for run in client.search_runs(
                [experiment.experiment_id], max_results=1000,
                filter_string=f"tags.`{lineage.TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' "
                              "and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
