"""meta_train on several nodes: a Kubeflow Trainer TrainJob (``trainer.kubeflow.org/v1alpha1``).

With ``cluster.train.num_nodes`` > 1 the meta_train step does not train in its own pod. It

1. makes sure its input dataset is on the DVC remote (``version_dataset``: content-addressed, so a
   dataset the pseudo_label step pushed is hashed again but not uploaded again);
2. creates a TrainJob on the ``torch-distributed`` ClusterTrainingRuntime that runs the project
   image on ``num_nodes`` nodes as ``torchrun --no-python lesionflow train-worker …`` (the runtime
   sets torchrun's ``PET_*`` environment: node count, node rank, master address);
3. waits for its ``Complete`` or ``Failed`` condition (a watch, ``cluster.train.timeout_minutes``);
   a failure raises ``TrainJobFailedError`` with the condition's reason and the failed pods' exit
   codes and last log lines (the job is kept for its logs); success, a timeout, a SIGTERM (KFP
   cancelling the run) or any other error deletes the TrainJob;
4. downloads the model rank 0 left under ``<output_prefix>/<job>/`` into its own output and removes
   it from S3, so evaluate and register see exactly what in-pod training would have written.

Each worker process (``work``) restores the dataset version from the remote (a sharded one
trained plainly: only its val split, the train split is streamed), trains with
``lesionflow.distributed.run_worker`` (rank 0 logging to a child run of the step's MLflow run)
and, on rank 0, uploads the model. The body is built from the
``kubeflow-trainer-api`` models (the Trainer project's own generated types), not hand-written dicts.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lesionflow.config import Params
from lesionflow.errors import TrainJobError, TrainJobFailedError, TrainJobTimeoutError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # the torch-distributed runtime's replicated job and its trainer container
MANAGER = "lesionflow"  # owner of our runtime patch (node placement)
# the JobSet the Trainer makes has the TrainJob's name; its pods carry this label
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_LOG_LINES = 20  # of the first failed pod, in the error


@dataclass(frozen=True)
class TrainJobRef:
    """Where a created TrainJob lives and where its rank 0 leaves the model."""

    namespace: str
    name: str
    output: str  # s3://bucket/prefix/<name>


def new_name() -> str:
    """RFC 1035 label, short enough that the JobSet's pod names (``<name>-node-0-0-xxxxx``) stay
    within 63 characters."""
    return f"lesionflow-{uuid.uuid4().hex[:12]}"


def output_prefix(params: Params) -> str:
    """``cluster.train.output_prefix``, else ``s3://<bucket of runtime.dvc_remote>/trainjobs``."""
    prefix = params.cluster.train.output_prefix
    if prefix is None:
        bucket = params.runtime.remote().removeprefix("s3://").partition("/")[0]
        prefix = f"s3://{bucket}/trainjobs"
    return prefix.rstrip("/")


def build_trainjob(params: Params, *, name: str, image: str, dataset_md5: str, output: str,
                   mlflow_run_id: str | None = None) -> dict[str, Any]:
    """The TrainJob body: the project image on ``num_nodes`` nodes running ``lesionflow
    train-worker`` under torchrun, resources per node, the credentials Secret's keys as env (as
    every pipeline step gets them), the MLflow server and the run rank 0 logs into
    (``mlflow_run_id``), and, when set, node selector + GPU toleration as a runtime patch.
    ``activeDeadlineSeconds`` = the step's timeout, so the cluster stops the job even if the step
    dies without deleting it."""
    from kubeflow_trainer_api import models as m

    cluster, cfg = params.cluster, params.cluster.train
    args = ["--params-json", params.model_dump_json(), "--dataset-md5", dataset_md5, "--output", output]
    env = [m.IoK8sApiCoreV1EnvVar(name=key, value_from=m.IoK8sApiCoreV1EnvVarSource(
        secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=cluster.credentials_secret, key=key,
                                                         optional=True)))
           for key in (cluster.secret_env if cluster.credentials_secret else [])]
    # lesionflow.distributed.run_worker: rank 0 logs to this store and run, the others nowhere
    env.append(m.IoK8sApiCoreV1EnvVar(name="MLFLOW_TRACKING_URI", value=params.runtime.tracking_uri()))
    if mlflow_run_id:
        env.append(m.IoK8sApiCoreV1EnvVar(name="MLFLOW_RUN_ID", value=mlflow_run_id))
    quantities = {"cpu": cfg.cpu, "memory": cfg.memory,
                  "nvidia.com/gpu": str(cfg.gpus) if cfg.gpus else None}
    limits = {key: m.IoK8sApimachineryPkgApiResourceQuantity(value)
              for key, value in quantities.items() if value}
    resources = m.IoK8sApiCoreV1ResourceRequirements(
        limits=limits, requests={k: v for k, v in limits.items() if k != "nvidia.com/gpu"} or None
    ) if limits else None
    trainer = m.TrainerV1alpha1Trainer(
        image=image, command=["torchrun", "--no-python", "lesionflow", "train-worker"], args=args,
        env=env, num_nodes=cfg.num_nodes, num_proc_per_node=cfg.procs_per_node,
        resources_per_node=resources)
    patches = None
    if cfg.node_selector or cfg.gpus:
        pod = m.TrainerV1alpha1PodSpecPatch(
            node_selector=cfg.node_selector or None,
            # GPU nodes are usually tainted so only GPU work lands there (as for the steps' pods)
            tolerations=[m.IoK8sApiCoreV1Toleration(key="nvidia.com/gpu", operator="Exists",
                                                     effect="NoSchedule")] if cfg.gpus else None)
        job = m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))))
        patches = [m.TrainerV1alpha1RuntimePatch(
            manager=MANAGER, training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
                template=m.TrainerV1alpha1JobSetTemplatePatch(
                    spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[job]))))]
    body = m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, labels={"app.kubernetes.io/name": "lesionflow",
                               "app.kubernetes.io/component": "meta-train"}),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(api_group=GROUP, kind="ClusterTrainingRuntime",
                                                    name=cfg.runtime),
            trainer=trainer, runtime_patches=patches,
            active_deadline_seconds=math.ceil(cfg.timeout_minutes * 60)))
    return body.to_dict()


def kubernetes_api(namespace: str | None) -> tuple[Any, str]:
    """An ApiClient and the namespace: in a pod its service account and own namespace, else the
    kubeconfig (``$KUBECONFIG``) and its context's namespace; ``namespace`` wins when set."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        found = _SA_NAMESPACE.read_text().strip()
    except config.ConfigException:
        # $KUBECONFIG as it is now (kubernetes reads it once, when imported)
        kubeconfig = os.environ.get("KUBECONFIG") or config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        try:
            config.load_kube_config(kubeconfig, client_configuration=configuration)
            _, active = config.list_kube_config_contexts(kubeconfig)
        except (config.ConfigException, OSError) as err:
            raise TrainJobError(f"no Kubernetes API to create the TrainJob on: not in a pod and no "
                                f"usable kubeconfig ({err}); run the step on the cluster or set "
                                "KUBECONFIG, or set cluster.train.num_nodes: 1") from None
        found = active["context"].get("namespace") or "default"
    return client.ApiClient(configuration), namespace or found


def create(api: Any, namespace: str, body: dict) -> None:
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                     PLURAL, body)
    except client.ApiException as err:
        name = body["metadata"]["name"]
        hint = {403: "the step's service account may not create TrainJobs: install the chart with "
                     "rbac.trainjobs.enabled=true (serviceAccount: the pipeline's)",
                404: "is Kubeflow Trainer v2 installed (the trainjobs.trainer.kubeflow.org CRD)?",
                }.get(err.status, "")
        raise TrainJobError(f"the cluster refused TrainJob {namespace}/{name}: {err.status} "
                            f"{_api_message(err)}{'; ' + hint if hint else ''}") from None


def delete(api: Any, namespace: str, name: str) -> None:
    """Delete the TrainJob and, in the background, its JobSet and pods; gone already is fine."""
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")
    except client.ApiException as err:
        if err.status != 404:
            raise TrainJobError(f"could not delete TrainJob {namespace}/{name}: {err.status} "
                                f"{_api_message(err)}; delete it by hand") from None
    print(f"deleted TrainJob {namespace}/{name}")


def finished(trainjob: dict) -> str | None:
    """``Complete`` or ``Failed`` once the TrainJob has that condition, else None."""
    for condition in (trainjob.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def wait(api: Any, namespace: str, name: str, timeout_seconds: float) -> dict:
    """The TrainJob once it is Complete or Failed: a GET, then a watch from its resourceVersion
    (again after the watch expires or the API server says 410 Gone), until ``timeout_seconds``."""
    from kubernetes import client, watch

    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as err:
            if err.status == 404:
                raise TrainJobError(f"TrainJob {namespace}/{name} disappeared (deleted by someone "
                                    "else?) before it finished") from None
            raise
        if finished(job):
            return job
        seconds = max(1, math.ceil(min(remaining, 300)))
        try:
            for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                    field_selector=f"metadata.name={name}", timeout_seconds=seconds,
                    resource_version=job["metadata"].get("resourceVersion"),
                    _request_timeout=seconds + 30):
                if event["type"] == "DELETED":
                    raise TrainJobError(f"TrainJob {namespace}/{name} was deleted (by someone "
                                        "else?) before it finished")
                if finished(event["object"]):
                    return event["object"]
        except client.ApiException as err:
            if err.status != 410:  # 410 Gone: the resourceVersion is too old; GET again
                raise
    raise TrainJobTimeoutError(f"TrainJob {namespace}/{name} did not finish within "
                               f"{timeout_seconds / 60:g} min (cluster.train.timeout_minutes)")


def failure_reason(api: Any, namespace: str, trainjob: dict) -> str:
    """The Failed condition's reason and message, then what the pods say: each failed container's
    exit code and reason, and the last log lines of the first one (best effort: RBAC or a pod
    already gone must not hide the condition)."""
    from kubernetes import client

    failed = next(c for c in trainjob["status"]["conditions"] if c["type"] == "Failed")
    lines = [f"{failed.get('reason', 'Failed')}: {failed.get('message', '')}".rstrip(": ")]
    core = client.CoreV1Api(api)
    try:
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"{JOBSET_LABEL}={trainjob['metadata']['name']}").items
        logged = False
        for pod in pods:
            for status in pod.status.container_statuses or []:
                ended = status.state.terminated if status.state else None
                if ended is None or not ended.exit_code:
                    continue
                lines.append(f"pod {pod.metadata.name}: container {status.name} exited "
                             f"{ended.exit_code} ({ended.reason or 'Error'})"
                             + (f": {ended.message.strip()}" if ended.message else ""))
                if not logged:
                    log = core.read_namespaced_pod_log(pod.metadata.name, namespace,
                                                       container=status.name, tail_lines=_LOG_LINES)
                    lines += [f"  | {line}" for line in log.rstrip().splitlines()]
                    logged = True
    except client.ApiException as err:
        lines.append(f"(pods or their logs not readable: {err.status} {err.reason})")
    return "\n".join(lines)


@contextmanager
def deleted_unless_failed(api: Any, namespace: str, name: str) -> Iterator[None]:
    """Delete the TrainJob when the block ends, unless it failed (kept so its pods' logs can be
    read). SIGTERM — KFP cancelling the run, the step's pod evicted — is raised as ``SystemExit``
    here, so the job is deleted instead of training on with no one waiting for it."""
    def terminated(signum, _frame):
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except TrainJobFailedError:
        raise
    except BaseException:
        try:
            delete(api, namespace, name)
        except TrainJobError as err:  # the first error is the one to report
            print(f"lesionflow: {err}", file=sys.stderr)
        raise
    else:
        delete(api, namespace, name)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(params: Params, dataset_md5: str, out_dir: Path, *, image: str,
        mlflow_run_id: str | None = None) -> TrainJobRef:
    """Create the TrainJob, wait for it, and put the model it trained into ``out_dir``."""
    cfg = params.cluster.train
    api, namespace = kubernetes_api(cfg.namespace)
    name = new_name()
    ref = TrainJobRef(namespace, name, f"{output_prefix(params)}/{name}")
    body = build_trainjob(params, name=name, image=image, dataset_md5=dataset_md5, output=ref.output,
                          mlflow_run_id=mlflow_run_id)
    with api:
        create(api, namespace, body)
        print(f"created TrainJob {namespace}/{name}: {cfg.num_nodes} nodes, runtime {cfg.runtime}, "
              f"image {image}")
        with deleted_unless_failed(api, namespace, name):
            job = wait(api, namespace, name, cfg.timeout_minutes * 60)
            if finished(job) == "Failed":
                raise TrainJobFailedError(f"TrainJob {namespace}/{name} failed: "
                                          f"{failure_reason(api, namespace, job)}")
            download_model(ref.output, out_dir, params.runtime.s3_endpoint_url, remove=True)
    return ref


# --- S3: rank 0 leaves the model, the step collects it -------------------------------------------

def _s3(endpoint_url: str | None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/") + "/"


def upload_model(model_dir: Path, uri: str, endpoint_url: str | None) -> int:
    """Rank 0: every file of ``model_dir`` under ``uri`` (same relative paths); the file count."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split(uri)
    client = _s3(endpoint_url)
    files = [p for p in sorted(Path(model_dir).rglob("*")) if p.is_file()]
    try:
        for path in files:
            client.upload_file(str(path), bucket, prefix + path.relative_to(model_dir).as_posix())
    except (BotoCoreError, ClientError) as err:
        raise TrainJobError(f"rank 0 could not upload the model to {uri}: {err}") from None
    return len(files)


def download_model(uri: str, out_dir: Path, endpoint_url: str | None, *, remove: bool) -> int:
    """The step: the model under ``uri`` into ``out_dir`` (and off S3 with ``remove``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split(uri)
    client = _s3(endpoint_url)
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])]
        if not keys:
            raise TrainJobError(f"the TrainJob completed but left no model at {uri}: did rank 0 "
                                "run lesionflow train-worker with this --output?")
        for key in keys:
            rel = PurePosixPath(key[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise TrainJobError(f"refusing S3 key {key!r}: it would escape {out_dir}")
            dest = Path(out_dir).joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(dest))
        if remove:
            for start in range(0, len(keys), 1000):  # the API's batch limit
                client.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
    except (BotoCoreError, ClientError) as err:
        raise TrainJobError(f"could not collect the TrainJob's model from {uri}: {err}") from None
    return len(keys)


# --- inside the TrainJob's pods ------------------------------------------------------------------

def work(params: Params, dataset_md5: str, output: str, *, scratch: Path | None = None) -> None:
    """One torchrun worker process: the dataset version restored once per pod (the node's other
    local ranks wait on a file lock and reuse it), ``lesionflow.distributed.run_worker`` (which logs
    from rank 0 to ``MLFLOW_RUN_ID``, the step's child run), and on rank 0 the model (with the
    worker's ``result.json``) uploaded to ``output``.

    A version stored as shards (``ingest.layout: shards``) trained plainly is not restored whole:
    only its top-level files and val split come to disk, and each rank streams its own train
    shards from the remote (``data.shards.RemoteShards``)."""
    from lesionflow.data.shards import SHARD_INDEX, RemoteShards
    from lesionflow.distributed import run_worker
    from lesionflow.versioning import remote_listing, restore_dataset

    rank = int(os.environ.get("RANK", "0"))
    scratch = Path(scratch or Path(tempfile.gettempdir()) / "lesionflow-train-worker")
    scratch.mkdir(parents=True, exist_ok=True)
    remote, endpoint = params.runtime.remote(), params.runtime.s3_endpoint_url
    # meta-training draws its task pools by index over the whole train split: it needs every file
    stream = (not params.meta_train.enabled
              and SHARD_INDEX in remote_listing(dataset_md5, remote=remote, endpoint_url=endpoint))
    train_shards = RemoteShards(dataset_md5, remote=remote, endpoint_url=endpoint) if stream else None
    # a version's content never changes, so the folder is reused by the node's other ranks
    dataset = scratch / (dataset_md5.removesuffix(".dir") + ("-val" if stream else ""))
    with open(scratch / ".restore.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stream and not dataset.exists():  # both move the finished copy into place at once
            train_shards.fetch(dataset, splits=("val",))
        elif not dataset.exists():
            restore_dataset(dataset_md5, dataset, remote=remote, endpoint_url=endpoint,
                            retry_seconds=params.runtime.service_wait_seconds)
    # in here the meta_train step's code trains in-process: it must not start another TrainJob
    here = params.with_section("cluster", train=params.cluster.train.model_copy(update={"num_nodes": 1}))
    with tempfile.TemporaryDirectory(prefix=f"model-rank{rank}-", dir=scratch) as out:
        run_worker(here, dataset, Path(out), train_shards)
        if rank == 0:
            n = upload_model(Path(out), output, params.runtime.s3_endpoint_url)
            print(json.dumps({"uploaded": n, "to": output}))


def _api_message(err: Any) -> str:
    """The API server's Status message (JSON body), else the HTTP reason."""
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(err.reason)
