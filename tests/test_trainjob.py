"""meta_train on several nodes as a Kubeflow Trainer TrainJob (``lesionflow.trainjob``).

No cluster runs here, so: the TrainJob body is validated against the Trainer v2.3.0 CRD's OpenAPI
v3 schema (vendored in tests/data, made strict: a field the API server would prune fails), and the
create → watch → collect / fail / delete conversation runs through the real ``kubernetes`` client
against a local stand-in for the API server that records every request. The stand-in cannot run
pods: when it reports the job Complete it first does what rank 0 would do — upload a real saved
model with ``upload_model`` to the ``--output`` the body names. Datasets and models move through a
real moto S3 server and real ``dvc``.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import pytest
import torch
import yaml

from lesionflow import cli, config, trainjob
from lesionflow.distributed import RESULT_FILE
from lesionflow.errors import TrainJobError, TrainJobFailedError, TrainJobTimeoutError
from lesionflow.models import build_model
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model, save_model
from tests.conftest import REPO, free_port
from tests.test_chart import helm  # noqa: F401  (the fixture: a real helm binary)

CRD = Path(__file__).parent / "data" / "trainer.kubeflow.org_trainjobs-v2.3.0.yaml"
MD5 = "0123456789abcdef0123456789abcdef.dir"
NAMESPACE = "ml"


def cluster_params(**train) -> config.Params:
    """Validated like a user's file (an s3 DVC remote and an MLflow server are required)."""
    sets = [f"cluster.train.{key}={json.dumps(value)}" for key, value in
            {"num_nodes": 2, **train}.items()]
    return config.load(None, ["runtime.dvc_remote=s3://lesions/dvc",
                              "runtime.mlflow_tracking_uri=http://mlflow.ml:5000", *sets])


# --- (a) the body against the CRD ---------------------------------------------------------------

def _strict(schema: dict) -> dict:
    """The API server silently prunes fields its structural schema does not know; a test should
    fail on them instead, so every object with ``properties`` gets ``additionalProperties: false``
    unless it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.load(CRD.read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == trainjob.VERSION)
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"], crd["spec"]["names"]["plural"]) == (
        trainjob.GROUP, trainjob.KIND, trainjob.PLURAL)
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # The two CEL rules on the whole object (jsonschema cannot run CEL): asserted verbatim so an
    # upstream change is noticed, then checked in Python below.
    assert [r["rule"] for r in schema["x-kubernetes-validations"]] == [
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')", "size(self.metadata.name) <= 63"]
    return jsonschema.Draft7Validator(schema)


def check_body(validator: jsonschema.Draft7Validator, body: dict) -> None:
    validator.validate(body)
    name = body["metadata"]["name"]
    import re

    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def test_trainjob_body_matches_the_crd_and_the_worker_cli(crd_validator):
    params = cluster_params(gpus=1, cpu="8", memory="32Gi", procs_per_node=1, timeout_minutes=90,
                            node_selector={"pool": "gpu"})
    name = trainjob.new_name()
    body = trainjob.build_trainjob(params, name=name, image="ghcr.io/lesionflow/lesionflow:0.1.0-abc",
                                   dataset_md5=MD5, output=f"s3://lesions/trainjobs/{name}",
                                   mlflow_run_id="r123")
    check_body(crd_validator, body)
    spec = body["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 90 * 60
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (
        2, 1, "ghcr.io/lesionflow/lesionflow:0.1.0-abc")
    assert trainer["resourcesPerNode"] == {"limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                           "requests": {"cpu": "8", "memory": "32Gi"}}
    # the credentials Secret reaches the pods as it reaches every pipeline step; rank 0 logs into
    # the run the step made for it
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"] for e in trainer["env"]}
    assert set(env) == {*params.cluster.secret_env, "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "lesionflow-credentials", "key": "AWS_ACCESS_KEY_ID",
                                        "optional": True}
    assert (env["MLFLOW_TRACKING_URI"], env["MLFLOW_RUN_ID"]) == ("http://mlflow.ml:5000", "r123")
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    assert pod["template"]["spec"]["template"]["spec"] == {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    # what the pods run is the real CLI: torchrun execs `lesionflow train-worker <args>`
    command = trainer["command"]
    assert command[:3] == ["torchrun", "--no-python", "lesionflow"]
    args = cli.build_parser().parse_args(command[3:] + trainer["args"])
    assert args.func is cli.cmd_train_worker
    assert config.from_json(args.params_json) == params
    assert (args.dataset_md5, args.output) == (MD5, f"s3://lesions/trainjobs/{name}")


def test_a_minimal_body_has_no_empty_optional_parts(crd_validator):
    body = trainjob.build_trainjob(cluster_params(), name="lesionflow-x", image="img", dataset_md5=MD5,
                                   output="s3://lesions/trainjobs/lesionflow-x")
    check_body(crd_validator, body)
    assert "runtimePatches" not in body["spec"] and "resourcesPerNode" not in body["spec"]["trainer"]
    assert "numProcPerNode" not in body["spec"]["trainer"]  # the runtime's auto


@pytest.mark.parametrize("break_it", [
    lambda b: b["spec"]["trainer"].update(numNodes="2"),  # a string where the CRD wants int32
    lambda b: b["spec"].pop("runtimeRef"),  # required
    lambda b: b["spec"]["trainer"].update(numNode=2),  # a typo the API server would prune
    lambda b: b["spec"]["trainer"].update(resourcesPerNode={"limits": {"cpu": "lots"}}),  # quantity
])
def test_a_broken_body_fails_the_schema(crd_validator, break_it):
    body = trainjob.build_trainjob(cluster_params(cpu="2"), name="lesionflow-x", image="img",
                                   dataset_md5=MD5, output="s3://lesions/trainjobs/lesionflow-x")
    check_body(crd_validator, body)
    break_it(body)
    with pytest.raises(jsonschema.ValidationError):
        crd_validator.validate(body)


def test_old_flat_cluster_keys_name_their_new_place():
    with pytest.raises(config.ConfigError, match=r"cluster.train_gpus moved: set cluster.train.gpus"):
        config.load(None, ["cluster.train_gpus=1"])


def test_several_nodes_need_a_shared_remote_and_tracking_server():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["cluster.train.num_nodes=2"])
    assert "runtime.dvc_remote" in str(err.value) and "runtime.mlflow_tracking_uri" in str(err.value)


def test_warm_start_on_several_nodes_is_refused_before_any_job(tmp_path):
    """``retrain --warm-start`` pins train.init_from after validation: the step itself refuses."""
    from lesionflow.steps import meta_train

    params = cluster_params().with_section("train", init_from="3")
    with pytest.raises(config.ConfigError, match=r"train.init_from: 3 with cluster.train.num_nodes > 1"):
        meta_train.train_on_cluster(params, tmp_path / "dataset", tmp_path / "model")


# --- (b) the conversation with the API server ----------------------------------------------------

class FakeKube(BaseHTTPRequestHandler):
    """Answers like the API server for one TrainJob. ``outcome`` says what the watch reports after
    the job starts: "Complete" (after the pods' upload), "Failed", or None (it runs on, for the
    timeout and cancel tests). Watches end after their ``timeoutSeconds``, as the server's do."""

    requests: list[tuple[str, str, dict]] = []
    jobs: dict[str, dict] = {}
    outcome: str | None = None
    on_complete = None  # what rank 0 would have done before the job completes

    def _send(self, status: int, body: dict | str, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, what: str) -> None:
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                         "reason": "NotFound", "message": f"{what} not found"})

    def _record(self, method: str) -> tuple[str, dict]:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        FakeKube.requests.append((method, self.path, body))
        return url.path, {k: v[0] for k, v in parse_qs(url.query).items()}

    def do_POST(self):
        path, _ = self._record("POST")
        body = FakeKube.requests[-1][2]
        if path != f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs":
            return self._not_found(path)
        job = {**body, "metadata": {**body["metadata"], "namespace": NAMESPACE, "resourceVersion": "1",
                                    "uid": "u-1"}}
        FakeKube.jobs[body["metadata"]["name"]] = job
        self._send(201, job)

    def do_DELETE(self):
        path, _ = self._record("DELETE")
        name = path.rsplit("/", 1)[-1]
        if FakeKube.jobs.pop(name, None) is None:
            return self._not_found(name)
        self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def do_GET(self):
        path, query = self._record("GET")
        base = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
        if path == base and query.get("watch", "").lower() == "true":  # the client sends "True"
            return self._watch(query)
        if path.startswith(base + "/"):
            job = FakeKube.jobs.get(path.rsplit("/", 1)[-1])
            return self._send(200, job) if job else self._not_found(path)
        if path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                    "items": _failed_pods(query["labelSelector"])})
        if path.startswith(f"/api/v1/namespaces/{NAMESPACE}/pods/") and path.endswith("/log"):
            return self._send(200, "Traceback (most recent call last):\n  ...\n"
                                   "RuntimeError: CUDA out of memory\n", "text/plain")
        self._not_found(path)

    def _watch(self, query: dict) -> None:
        name = query["fieldSelector"].removeprefix("metadata.name=")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        job = FakeKube.jobs[name]
        self._event("MODIFIED", job, [{"type": "Created", "status": "True", "reason": "JobSetCreated"}])
        if FakeKube.outcome == "Complete":
            FakeKube.on_complete(job)
            self._event("MODIFIED", job, [{"type": "Complete", "status": "True", "reason": "JobSetCompleted",
                                           "message": "jobset completed successfully"}])
        elif FakeKube.outcome == "Failed":
            self._event("MODIFIED", job, [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                           "message": "jobset failed due to reaching max restarts"}])
        else:  # still running: hold the watch open until its timeout
            end = time.monotonic() + float(query["timeoutSeconds"])
            while time.monotonic() < end and name in FakeKube.jobs:
                time.sleep(0.05)
        self.close_connection = True

    def _event(self, kind: str, job: dict, conditions: list[dict]) -> None:
        stamp = {"lastTransitionTime": "2026-11-29T16:00:00Z"}
        version = str(int(job["metadata"]["resourceVersion"]) + 1)
        job.update(status={"conditions": [{**stamp, "message": "", **c} for c in conditions]},
                   metadata={**job["metadata"], "resourceVersion": version})
        self.wfile.write(json.dumps({"type": kind, "object": job}).encode() + b"\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


def _failed_pods(selector: str) -> list[dict]:
    name = selector.removeprefix(f"{trainjob.JOBSET_LABEL}=")

    def pod(index: int, exit_code: int, reason: str) -> dict:
        state = {"terminated": {"exitCode": exit_code, "reason": reason}}
        return {"metadata": {"name": f"{name}-node-0-{index}-abcde"},
                "status": {"phase": "Failed" if exit_code else "Succeeded", "containerStatuses": [
                    {"name": "node", "ready": False, "restartCount": 0, "image": "img", "imageID": "",
                     "state": state}]}}

    return [pod(0, 0, "Completed"), pod(1, 1, "Error")]


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """The stand-in API server and a kubeconfig pointing at it (namespace "ml")."""
    FakeKube.requests, FakeKube.jobs, FakeKube.outcome, FakeKube.on_complete = [], {}, None, None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKube)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "step", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "stand-in", "user": "step",
                                                  "namespace": NAMESPACE}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield FakeKube
    server.shutdown()


def calls(kube) -> list[tuple[str, str]]:
    return [(method, urlparse(path).path.rsplit("/", 1)[-1]) for method, path, _ in kube.requests]


def tiny_model() -> Segmenter:
    params = config.load(None, ["model.depth=2", "model.base_channels=4"])
    torch.manual_seed(0)
    return Segmenter(build_model(params.model), 32, [0.0] * 3, [1.0] * 3)


def rank0_uploads(kube, model: Segmenter, tmp_path: Path, endpoint: str) -> None:
    """The stand-in's pods: before the job completes, rank 0 uploads a real saved model (and the
    worker's result.json) to the ``--output`` of the body it was created with, with the worker's
    own ``upload_model``."""
    def upload(job: dict) -> None:
        save_model(model, tmp_path / "rank0")
        (tmp_path / "rank0" / RESULT_FILE).write_text('{"training": "meta", "world_size": 4}')
        args = job["spec"]["trainer"]["args"]
        trainjob.upload_model(tmp_path / "rank0", args[args.index("--output") + 1], endpoint)

    kube.outcome, kube.on_complete = "Complete", upload


def test_success_collects_the_model_and_deletes_the_job(kube, s3_server, s3_bucket, tmp_path):
    import boto3

    params = cluster_params(output_prefix=f"s3://{s3_bucket}/jobs")
    params = params.with_section("runtime", s3_endpoint_url=s3_server)
    trained = tiny_model()
    rank0_uploads(kube, trained, tmp_path, s3_server)
    ref = trainjob.run(params, MD5, tmp_path / "model", image="img")
    assert (ref.namespace, ref.output) == (NAMESPACE, f"s3://{s3_bucket}/jobs/{ref.name}")
    assert calls(kube) == [("POST", "trainjobs"), ("GET", ref.name), ("GET", "trainjobs"),
                           ("DELETE", ref.name)]
    assert not kube.jobs
    got = load_model(tmp_path / "model")
    for a, b in zip(got.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    left = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="jobs/")
    assert "Contents" not in left  # collected, then removed


def test_a_completed_job_without_a_model_is_named(kube, s3_server, s3_bucket, tmp_path):
    params = cluster_params(output_prefix=f"s3://{s3_bucket}/jobs").with_section(
        "runtime", s3_endpoint_url=s3_server)
    kube.outcome, kube.on_complete = "Complete", lambda job: None
    with pytest.raises(TrainJobError, match=r"completed but left no model at s3://"):
        trainjob.run(params, MD5, tmp_path / "model", image="img")
    assert not kube.jobs  # not a failed job: nothing to keep


def run_the_pods(job: dict, nproc: int, tmp_path: Path) -> None:
    """What the torch-distributed runtime would start, on this machine: the body's command, args
    and plain env under the ``PET_*`` variables the runtime sets (one node of ``nproc`` processes
    here; ``numNodes`` of them on a cluster), the venv's bin first on PATH as the image's is. The
    Secret's keys come from this environment (the moto server's credentials)."""
    trainer = job["spec"]["trainer"]
    env = {**os.environ, **{e["name"]: e["value"] for e in trainer["env"] if "value" in e},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PET_NNODES": "1", "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": "0",
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    pods = subprocess.run(trainer["command"] + trainer["args"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert pods.returncode == 0, pods.stderr[-5000:]


@pytest.mark.slow
def test_meta_train_step_trains_through_a_trainjob(kube, s3_server, s3_bucket, mlflow_server, tmp_path):
    """The step's branch end to end, the pods being real worker processes: the step versions its
    dataset, creates the TrainJob; its command restores that version from the DVC remote on moto,
    trains on 2 torchrun ranks, rank 0 logs into a child run of the step's run on a real MLflow
    server and uploads the model; the step collects it as its output (the workers' result.json goes
    to MLflow, not into the model) and deletes the job."""
    import mlflow

    from lesionflow import tracking
    from lesionflow.steps import meta_train
    from lesionflow.steps.ingest import build_dataset

    params = config.load(None, [
        "ingest.source=synthetic", "synthetic.n_images=12", "synthetic.n_videos=0", "synthetic.n_weak=0",
        "synthetic.size=32", "train.image_size=32", "train.batch_size=2", "train.epochs=1",
        "train.device=cpu", "model.base_channels=4", "model.depth=2", "meta_train.enabled=false",
        f"runtime.workdir={tmp_path / 'work'}", f"runtime.s3_endpoint_url={s3_server}",
        f"runtime.dvc_remote=s3://{s3_bucket}/dvc", f"runtime.mlflow_tracking_uri={mlflow_server}",
        "runtime.experiment=trainjob", "cluster.train.num_nodes=2"])
    build_dataset(params, tmp_path / "dataset")
    kube.outcome, kube.on_complete = "Complete", lambda job: run_the_pods(job, 2, tmp_path)
    tracking.connect(params)
    with mlflow.start_run() as run:
        meta_train.train_on_cluster(params, tmp_path / "dataset", tmp_path / "model")
    assert load_model(tmp_path / "model")(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["records.json", "segmenter.pt"]
    assert [m for m, _ in calls(kube)][-1] == "DELETE" and not kube.jobs
    trainer = kube.requests[0][2]["spec"]["trainer"]
    child = mlflow.get_run(next(e["value"] for e in trainer["env"] if e["name"] == "MLFLOW_RUN_ID"))
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert "train_loss" in child.data.metrics  # rank 0 trained and logged there
    step = mlflow.get_run(run.info.run_id)
    assert step.data.params["cluster.trainjob"].startswith(f"{NAMESPACE}/lesionflow-")
    result = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/meta/trainjob_result.json"))
    assert (result["world_size"], result["training"]) == (2, "plain")


def test_failure_raises_the_reason_and_keeps_the_job(kube, tmp_path):
    kube.outcome = "Failed"
    with pytest.raises(TrainJobFailedError) as err:
        trainjob.run(cluster_params(), MD5, tmp_path / "model", image="img")
    text = str(err.value)
    name = next(iter(kube.jobs))
    assert f"TrainJob {NAMESPACE}/{name} failed: FailedJobs: jobset failed due to reaching max restarts" in text
    assert f"pod {name}-node-0-1-abcde: container node exited 1 (Error)" in text
    assert "RuntimeError: CUDA out of memory" in text  # the failed pod's last log lines
    assert f"pod {name}-node-0-0" not in text  # the pod that succeeded is not blamed
    assert "DELETE" not in [m for m, _ in calls(kube)]  # kept for kubectl logs
    assert not (tmp_path / "model").exists()


def test_timeout_deletes_the_job(kube, tmp_path):
    params = cluster_params(timeout_minutes=1.5 / 60)
    started = time.monotonic()
    with pytest.raises(TrainJobTimeoutError, match=r"did not finish within 0.025 min"):
        trainjob.run(params, MD5, tmp_path / "model", image="img")
    assert time.monotonic() - started < 10
    methods = [m for m, _ in calls(kube)]
    assert methods[0] == "POST" and "GET" in methods and methods[-1] == "DELETE"
    assert not kube.jobs


def test_sigterm_to_the_step_deletes_the_job(kube, tmp_path):
    """KFP cancels a run by terminating the step's pod: the step process gets SIGTERM."""
    params = cluster_params()
    script = ("import sys; from pathlib import Path; from lesionflow import config, trainjob; "
              "trainjob.run(config.from_json(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), image='img')")
    step = subprocess.Popen([sys.executable, "-c", script, params.model_dump_json(), MD5,
                             str(tmp_path / "model")], cwd=REPO, env=os.environ.copy(),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any("watch=true" in path.lower() for _, path, _ in kube.requests):  # it is waiting now
            assert step.poll() is None, step.stderr.read()
            assert time.monotonic() < deadline, "the step never started watching"
            time.sleep(0.1)
        step.send_signal(signal.SIGTERM)
        assert step.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        step.kill()
    assert [m for m, _ in calls(kube)][-1] == "DELETE" and not kube.jobs


def test_refused_create_names_the_rbac_option(kube, tmp_path, monkeypatch):
    def forbidden(self):
        FakeKube.requests.append(("POST", self.path, {}))
        self._send(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                         "reason": "Forbidden", "message": 'trainjobs.trainer.kubeflow.org is forbidden: '
                         'User "system:serviceaccount:ml:pipeline-runner" cannot create resource'})

    monkeypatch.setattr(FakeKube, "do_POST", forbidden)
    with pytest.raises(TrainJobError, match=r"403 trainjobs.trainer.kubeflow.org is forbidden.*"
                                            r"rbac.trainjobs.enabled=true"):
        trainjob.run(cluster_params(), MD5, tmp_path / "model", image="img")


def test_no_kubeconfig_is_a_named_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(TrainJobError, match="no Kubernetes API"):
        trainjob.kubernetes_api(None)


# --- (c) the chart's RBAC option -----------------------------------------------------------------

def test_chart_grants_the_step_exactly_what_trainjobs_need(helm):  # noqa: F811
    chart = str(REPO / "charts" / "lesionflow")

    def roles(*args: str) -> dict[str, list[dict]]:
        docs = [d for d in yaml.safe_load_all(helm("template", "lf", chart, "--namespace", "ml", *args).stdout) if d]
        return {d["kind"]: d for d in docs if d["kind"] in ("Role", "RoleBinding")
                and d["metadata"]["name"] == "lf-lesionflow-trainjobs"}

    assert roles() == {}  # off by default
    found = roles("--set", "rbac.trainjobs.enabled=true", "--set", "rbac.trainjobs.namespace=team-a",
                  "--set", "rbac.trainjobs.serviceAccount=default-editor")
    role, binding = found["Role"], found["RoleBinding"]
    assert role["metadata"]["namespace"] == "team-a"
    assert role["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
         "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-a"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert roles("--set", "rbac.create=false", "--set", "rbac.trainjobs.enabled=true") == {}
    bad = helm("template", "lf", chart, "--set", "rbac.trainjobs.serviceAccount=", check=False)
    assert bad.returncode != 0 and "serviceAccount" in bad.stderr
