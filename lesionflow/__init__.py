"""lesionflow: lesion segmentation pipelines on Kubeflow, with DVC datasets and MLflow lineage."""

import atexit
import gc
import os

__version__ = "0.1.0"

# The one container image every pipeline component and every chart workload runs in (Dockerfile,
# charts/lesionflow/values.yaml). The checked-in pipeline YAML uses the version tag so it does not
# drift per commit; `lesionflow compile --image REF` (or LESIONFLOW_IMAGE at import) pins another,
# e.g. the `<version>-<gitsha>` tag scripts/build_image.sh pushes.
IMAGE_REPOSITORY = "ghcr.io/lesionflow/lesionflow"
IMAGE = os.environ.get("LESIONFLOW_IMAGE") or f"{IMAGE_REPOSITORY}:{__version__}"

# MLflow's default store is ./mlflow.db of whatever folder a process happens to run in. lesionflow's
# store is chosen by ``tracking.connect(params)``; until then any MLflow call fails with
# TrackingNotConnectedError instead of writing a stray database.
UNCONNECTED_TRACKING_URI = "lesionflow-unconnected:"
os.environ.setdefault("MLFLOW_TRACKING_URI", UNCONNECTED_TRACKING_URI)


def not_connected_store(*_args, **_kwargs):
    """The store MLflow builds for ``lesionflow-unconnected:`` (an MLflow plugin entry point in
    pyproject.toml, for tracking and the registry): it refuses."""
    from lesionflow.errors import TrackingNotConnectedError

    raise TrackingNotConnectedError(
        "MLflow was used before lesionflow.tracking.connect(params) chose the store (MLflow would "
        "have created ./mlflow.db in the current folder); call connect first, or set "
        "MLFLOW_TRACKING_URI explicitly for code outside lesionflow")


def skip_exit_gc() -> None:
    """Skip the collector's passes over every live object when this process exits. With torch,
    MLflow and kfp loaded they take 1–2 s — at every exit of every pipeline step — and free nothing
    the OS does not reclaim anyway. Reference counting still releases objects, and atexit handlers
    and weakref finalizers still run; only ``__del__`` of objects in reference cycles is skipped,
    which Python never promises at exit. Idempotent."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
