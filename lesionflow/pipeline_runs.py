"""Running the one ``@dsl.pipeline``: locally through kfp.local, or on a KFP cluster."""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path

from lesionflow import lease
from lesionflow.config import Params
from lesionflow.errors import ConfigError, LeaseHeldError


def run_local(params: Params) -> dict:
    """Run the compiled-for-cluster pipeline function in subprocesses of this interpreter.

    Another run holding the model's pipeline lease stops this one before it starts, or — if both
    started at once — in its first step; either way with a ``LeaseHeldError`` naming the holder
    rather than kfp's bare "task failed"."""
    from kfp import local

    from lesionflow import tracking
    from lesionflow.steps.entrypoints import PIPELINE_LEASE
    from pipelines.lesionflow_pipeline import lesionflow_pipeline

    workdir = params.runtime.resolved_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking.connect(params)
    _refuse_if_leased(params, PIPELINE_LEASE)
    # The project image is Python-based and the package is installed here; kfp.local can't know.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               raise_on_error=True)
    try:
        task = lesionflow_pipeline(params_json=params.model_dump_json())
    except RuntimeError:
        # a failed step releases this run's lease, so a holder now is another run
        _refuse_if_leased(params, PIPELINE_LEASE)
        raise
    return json.loads(task.output)


def _refuse_if_leased(params: Params, resource: str) -> None:
    holder = lease.current(params.runtime.model_name, resource)
    if holder is not None:
        raise LeaseHeldError(f"another pipeline run of {params.runtime.model_name} holds its "
                             f"{resource!r} lease: {holder}. One training run per model at a time: "
                             "retry when it has finished (a killed run's lease expires by itself)")


def submit(params: Params, *, host: str, experiment: str, run_name: str | None = None,
           schedule: str | None = None) -> str:
    """Compile the pipeline with ``params.cluster`` and submit it with these params: one run, or a
    recurring run on ``schedule`` (cron). Returns the KFP run or recurring-run id.

    Pods have no shared disk with this machine, so the embedded local defaults make no sense on
    a cluster: the tracking server and DVC remote must be named explicitly."""
    import kfp

    from pipelines.lesionflow_pipeline import compile_pipeline

    runtime = params.runtime
    if runtime.mlflow_tracking_uri is None or runtime.mlflow_tracking_uri.startswith("sqlite"):
        raise ConfigError("runtime.mlflow_tracking_uri must name a tracking server (http://…) for cluster runs")
    if runtime.dvc_remote is None or not runtime.dvc_remote.startswith("s3://"):
        raise ConfigError("runtime.dvc_remote must be an s3:// remote for cluster runs")
    cron = kfp_cron(schedule) if schedule else None
    arguments = {"params_json": params.model_dump_json()}
    client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory(prefix="lesionflow-compile-") as tmp:
        package = str(compile_pipeline(Path(tmp) / "pipeline.yaml", cluster=params.cluster))
        if cron is None:
            run = client.create_run_from_pipeline_package(
                package, arguments=arguments, experiment_name=experiment, run_name=run_name,
                pipeline_root=params.cluster.pipeline_root)
            return run.run_id
        experiment_id = client.create_experiment(experiment).experiment_id
        job = client.create_recurring_run(
            experiment_id, job_name=run_name or f"{experiment}-schedule", cron_expression=cron,
            params=arguments, pipeline_package_path=package, max_concurrency=1, no_catchup=True,
            pipeline_root=params.cluster.pipeline_root)
        return job.recurring_run_id


def kfp_cron(schedule: str) -> str:
    """KFP's scheduler takes six cron fields (seconds first); the usual five get ``0`` seconds."""
    fields = schedule.split()
    if len(fields) not in (5, 6) or not all(_CRON_FIELD.fullmatch(f) for f in fields):
        raise ConfigError(f"--schedule {schedule!r} is not a cron expression: five fields "
                          "(minute hour day-of-month month day-of-week, e.g. '0 3 * * *') or six "
                          "with seconds first")
    return " ".join(["0", *fields] if len(fields) == 5 else fields)


_CRON_FIELD = re.compile(r"[0-9A-Za-z*?/,\-LW#]+")
