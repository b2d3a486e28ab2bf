"""`lesionflow submit` against a local HTTP server speaking the KFP v2beta1 REST endpoints the
client calls (no KFP backend can run here): assert on the real request bodies."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from lesionflow import cli
from lesionflow.errors import ConfigError
from pipelines.lesionflow_pipeline import COMPILED
from tests.conftest import REPO


class FakeKFP(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        FakeKFP.requests.append(("GET", self.path, {}))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({})  # no experiment of that name yet
        else:
            self._reply({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        FakeKFP.requests.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif self.path == "/apis/v2beta1/runs":
            self._reply({"run_id": "run-42", "display_name": body.get("display_name"),
                         "experiment_id": body.get("experiment_id")})
        elif self.path == "/apis/v2beta1/recurringruns":
            self._reply({"recurring_run_id": "rec-7", "display_name": body.get("display_name")})
        else:
            self._reply({})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_host():
    FakeKFP.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


CLUSTER = ["--set", "runtime.mlflow_tracking_uri=http://mlflow.lesionflow:5000",
           "--set", "runtime.dvc_remote=s3://lesionflow-data/datasets"]


def test_submit_posts_the_compiled_pipeline_with_params(kfp_host, capsys):
    rc = cli.main(["submit", "--host", kfp_host, "--params", str(REPO / "params.yaml"), *CLUSTER,
                   "--set", "train.epochs=5", "--experiment", "polyps", "--run-name", "nightly"])
    assert rc == 0
    assert "submitted run run-42" in capsys.readouterr().out
    posts = {path: body for method, path, body in FakeKFP.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "polyps"
    run = posts["/apis/v2beta1/runs"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    # with default cluster settings, exactly the checked-in YAML (pipeline + platform document)
    pipeline_spec, platform_spec = yaml.safe_load_all(COMPILED.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}
    sent = json.loads(run["runtime_config"]["parameters"]["params_json"])
    assert sent["train"]["epochs"] == 5
    assert sent["runtime"]["dvc_remote"] == "s3://lesionflow-data/datasets"


def test_submit_refuses_local_only_settings(kfp_host):
    with pytest.raises(ConfigError, match="mlflow_tracking_uri"):
        from lesionflow import config
        from lesionflow.pipeline_runs import submit

        submit(config.load(REPO / "params.yaml"), host=kfp_host, experiment="x")
    assert not [r for r in FakeKFP.requests if r[0] == "POST"]
    assert cli.main(["submit", "--host", kfp_host, "--params", str(REPO / "params.yaml")]) == 2


def test_schedule_creates_a_recurring_run_with_cluster_settings(kfp_host, capsys):
    rc = cli.main(["submit", "--host", kfp_host, "--params", str(REPO / "params.yaml"), *CLUSTER,
                   "--schedule", "30 2 * * *", "--run-name", "nightly-retrain",
                   "--set", "cluster.train.gpus=1", "--set", "cluster.train.memory=16Gi",
                   "--set", "cluster.train.node_selector={pool: gpu}",
                   "--set", "cluster.pipeline_root=s3://lesionflow-data/kfp"])
    assert rc == 0
    assert "submitted recurring run rec-7 (30 2 * * *)" in capsys.readouterr().out
    posts = {path: body for method, path, body in FakeKFP.requests if method == "POST"}
    assert "/apis/v2beta1/runs" not in posts
    job = posts["/apis/v2beta1/recurringruns"]
    assert job["display_name"] == "nightly-retrain" and job["experiment_id"] == "exp-1"
    # KFP's scheduler wants six fields, seconds first; one run at a time, no backfill
    assert job["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"
    assert int(job["max_concurrency"]) == 1 and job["no_catchup"] is True
    assert json.loads(job["runtime_config"]["parameters"]["params_json"])["cluster"]["train"]["gpus"] == 1
    assert job["runtime_config"]["pipeline_root"] == "s3://lesionflow-data/kfp"
    executors = job["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-meta-train"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert "nodeSelector" not in executors["exec-register"]
    secret = executors["exec-register"]["secretAsEnv"][0]
    assert secret["secretName"] == "lesionflow-credentials"
    assert {e["envVar"] for e in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    train = job["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]["exec-meta-train"]["container"]
    assert train["resources"]["accelerator"]["resourceCount"] == "1"
    assert train["resources"]["memoryLimit"] == pytest.approx(16 * 2**30 / 1e9)  # 16Gi, in GB


def test_a_bad_schedule_is_refused_before_anything_is_sent(kfp_host):
    assert cli.main(["submit", "--host", kfp_host, "--params", str(REPO / "params.yaml"), *CLUSTER,
                     "--schedule", "every night"]) == 2
    assert not [r for r in FakeKFP.requests if r[0] == "POST"]
