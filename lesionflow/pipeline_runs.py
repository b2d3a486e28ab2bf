"""Running the one ``@dsl.pipeline``: locally through kfp.local, or on a KFP cluster."""

from __future__ import annotations

import json
import warnings

from lesionflow.config import Params
from lesionflow.errors import ConfigError


def run_local(params: Params) -> dict:
    """Run the compiled-for-cluster pipeline function in subprocesses of this interpreter."""
    from kfp import local

    from pipelines.lesionflow_pipeline import lesionflow_pipeline

    workdir = params.runtime.resolved_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    # The project image is Python-based and the package is installed here; kfp.local can't know.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               raise_on_error=True)
    task = lesionflow_pipeline(params_json=params.model_dump_json())
    return json.loads(task.output)


def submit(params: Params, *, host: str, experiment: str, run_name: str | None = None) -> str:
    """Submit the checked-in compiled YAML with these params; returns the KFP run id.

    Pods have no shared disk with this machine, so the embedded local defaults make no sense on
    a cluster: the tracking server and DVC remote must be named explicitly."""
    import kfp

    from pipelines.lesionflow_pipeline import COMPILED

    runtime = params.runtime
    if runtime.mlflow_tracking_uri is None or runtime.mlflow_tracking_uri.startswith("sqlite"):
        raise ConfigError("runtime.mlflow_tracking_uri must name a tracking server (http://…) for cluster runs")
    if runtime.dvc_remote is None or not runtime.dvc_remote.startswith("s3://"):
        raise ConfigError("runtime.dvc_remote must be an s3:// remote for cluster runs")
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        str(COMPILED), arguments={"params_json": params.model_dump_json()},
        experiment_name=experiment, run_name=run_name)
    return run.run_id
