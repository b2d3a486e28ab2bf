"""Running the one ``@dsl.pipeline``: locally through kfp.local, or on a KFP cluster."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lesionflow import errors, timing
from lesionflow.config import Params
from lesionflow.errors import (
    ConfigError,
    LeaseHeldError,
    LesionflowError,
    ServiceUnavailableError,
    SubmitError,
)


def run_local(params: Params) -> dict:
    """Run the compiled-for-cluster pipeline function in subprocesses of this interpreter.

    Another run holding the model's pipeline lease stops this one before it starts, or — if both
    started at once — in its first step; either way with a ``LeaseHeldError`` naming the holder
    rather than kfp's bare "task failed". Any other named error of a step (bad data, an
    unreachable remote, ...) is raised here as that same error class, naming the step."""
    from kfp import local

    from lesionflow import lease, tracking
    from lesionflow.steps.entrypoints import ERROR_REPORT_ENV, PIPELINE_LEASE
    from pipelines.lesionflow_pipeline import lesionflow_pipeline

    timing.begin("run")
    workdir = params.runtime.resolved_workdir()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking.connect(params)
    timing.mark("mlflow connect")
    _refuse_if_leased(params, PIPELINE_LEASE)
    timing.mark("lease acquire")
    # The project image is Python-based and the package is installed here; kfp.local can't know.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp"),
               raise_on_error=True)
    fd, report = tempfile.mkstemp(prefix=".step-error-", suffix=".json", dir=workdir)
    os.close(fd)
    # The steps' subprocesses inherit both: where to report a named error, and this process as
    # the owner of their lease (killed, its lease is taken over at once instead of expiring).
    with _environment({ERROR_REPORT_ENV: report, lease.OWNER_ENV: lease.process_identity()}):
        try:
            task = lesionflow_pipeline(params_json=params.model_dump_json())
        except RuntimeError:
            failure = step_failure(Path(report))
            if not isinstance(failure, ServiceUnavailableError):  # else the server can't answer
                # a failed step releases this run's lease, so a holder now is another run
                _refuse_if_leased(params, PIPELINE_LEASE)
            if failure is not None:
                raise failure from None
            raise
        finally:
            Path(report).unlink(missing_ok=True)
    timing.mark("exit")  # of the last step, and kfp.local collecting its output
    return json.loads(task.output)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def step_failure(report: Path) -> LesionflowError | None:
    """The named error a failed step wrote to ``report`` (see ``entrypoints.reported``), as the
    same class; None if the step wrote none (a bug: kfp's error and the step's log say more)."""
    try:
        failure = json.loads(report.read_text() or "null")
    except (OSError, ValueError):
        return None
    if not failure:
        return None
    cls = getattr(errors, failure["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, LesionflowError)):
        cls = LesionflowError
    return cls(f"{failure['message']}\n(in pipeline step {failure['step']}; its log is above)")


def _refuse_if_leased(params: Params, resource: str) -> None:
    from lesionflow import lease

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
    import urllib3
    from kfp_server_api.exceptions import ApiException

    runtime = params.runtime
    if runtime.mlflow_tracking_uri is None or runtime.mlflow_tracking_uri.startswith("sqlite"):
        raise ConfigError("runtime.mlflow_tracking_uri must name a tracking server (http://…) for cluster runs")
    if runtime.dvc_remote is None or not runtime.dvc_remote.startswith("s3://"):
        raise ConfigError("runtime.dvc_remote must be an s3:// remote for cluster runs")
    cron = kfp_cron(schedule) if schedule else None
    try:
        return _send(kfp.Client(host=host), params, cron, experiment, run_name)
    except urllib3.exceptions.HTTPError as err:
        raise ServiceUnavailableError(
            f"the KFP endpoint {host} did not answer ({err}); check --host (the KFP API's URL, "
            "e.g. https://kfp.example.org) and that Kubeflow Pipelines is up") from None
    except ApiException as err:
        raise SubmitError(f"the KFP endpoint {host} refused the request: {err.status} {err.reason}; "
                          "check --host, --experiment and your access to it") from None


def _send(client, params: Params, cron: str | None, experiment: str, run_name: str | None) -> str:
    from pipelines.lesionflow_pipeline import compile_pipeline

    arguments = {"params_json": params.model_dump_json()}
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
