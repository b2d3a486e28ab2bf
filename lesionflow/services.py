"""The outside services a run depends on: the MLflow tracking server and the DVC remote (a folder
or S3). On a cluster they restart, get rescheduled and have bad minutes, so every call waits for
them with bounded exponential backoff and jitter (tenacity), then fails with a named error that
says which service, at which address, and what to do — never a bare traceback after minutes of
silence (MLflow's own defaults retry a dead server for over four minutes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential_jitter,
)

from lesionflow.errors import RemoteUnavailableError, TrackingUnavailableError

T = TypeVar("T")

# MLflow's per-request retries, bounded: ~15 s of backoff before a call gives up, instead of
# minutes. Set only where the user has not chosen otherwise.
MLFLOW_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT = 5.0  # seconds: one health request


def bound_mlflow_http_retries() -> None:
    for key, value in MLFLOW_HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def _backoff(seconds: float) -> dict:
    return {"stop": stop_after_delay(seconds), "wait": wait_exponential_jitter(initial=0.5, max=8, jitter=1),
            "reraise": True}


def tracking_problem(uri: str) -> str | None:
    """Why the tracking server at ``uri`` cannot be used right now, or None if it answers. A local
    ``sqlite:///`` store has no server to be down."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT)
    except requests.RequestException as err:
        return _short(err)
    return f"HTTP {answer.status_code} from /health" if answer.status_code >= 500 else None


def wait_for_tracking(uri: str, seconds: float) -> None:
    """Return once the tracking server answers; TrackingUnavailableError after ``seconds``."""
    problem = Retrying(retry=retry_if_result(bool), retry_error_callback=_last_result,
                       **_backoff(seconds))(tracking_problem, uri)
    if problem:
        raise TrackingUnavailableError(tracking_unavailable_message(uri, problem, seconds))


def tracking_unavailable_message(uri: str, problem: str, waited: float) -> str:
    return (f"the MLflow tracking server at {uri} is unavailable ({problem}); waited {waited:g}s "
            "(runtime.service_wait_seconds). Start or restart it, or fix runtime.mlflow_tracking_uri, "
            "then run again: completed steps are versioned and a rerun repeats only what was lost")


def with_remote_retries(call: Callable[[], T], *, remote: str, endpoint_url: str | None,
                        seconds: float, transient: Callable[[BaseException], bool]) -> T:
    """``call()``, retried while it fails with an error ``transient`` accepts, for up to
    ``seconds``; then RemoteUnavailableError naming the remote. ``call`` must be idempotent
    (``dvc push``/``pull`` are: objects are content-addressed)."""
    try:
        return Retrying(retry=retry_if_exception(transient), **_backoff(seconds))(call)
    except Exception as err:
        if not transient(err):
            raise
        where = remote + (f" (endpoint {endpoint_url})" if endpoint_url else "")
        raise RemoteUnavailableError(
            f"the DVC remote {where} is unavailable after {seconds:g}s of retries "
            f"(runtime.service_wait_seconds): {_short(err)}. Check that the storage service is up "
            "and runtime.dvc_remote / runtime.s3_endpoint_url, then run again: pushes are "
            "idempotent and nothing half-written is ever referenced") from err


def _last_result(state: RetryCallState) -> str | None:
    return state.outcome.result()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:300]
