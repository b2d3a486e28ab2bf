"""The Helm chart, rendered by a real `helm template` and checked against the Kubernetes schemas
(kubernetes-validate, offline) for the default values and for ci/all-on-values.yaml, plus the
properties the chart promises: one image shared with the pipeline, credentials only from Secrets,
non-root read-only pods, least-privilege RBAC, a values schema that refuses bad input."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

import lesionflow
from lesionflow import cli, config
from pipelines.lesionflow_pipeline import COMPILED
from tests.conftest import REPO

CHART = REPO / "charts" / "lesionflow"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
HELM_BIN = REPO / ".lesionflow" / "bin" / "helm"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate bundles.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
VALUES = {"default": [], "all-on": ["-f", str(ALL_ON)]}


@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    """A helm binary: LESIONFLOW_HELM, PATH, or the one scripts/install_helm.sh puts in
    .lesionflow/bin (run here if absent; .ci/run runs it too, so CI never skips)."""
    found = os.environ.get("LESIONFLOW_HELM") or shutil.which("helm")
    if not found:
        if not HELM_BIN.exists():
            proc = subprocess.run([str(REPO / "scripts" / "install_helm.sh"), str(HELM_BIN.parent)],
                                  check=False, capture_output=True, text=True, timeout=300)
            if proc.returncode:
                pytest.skip(f"no helm binary and scripts/install_helm.sh failed: {proc.stderr[-500:]}")
        found = str(HELM_BIN)
    home = tmp_path_factory.mktemp("helm-home")
    # Keep helm away from the user's config, cache and any cluster.
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(home / "no-kubeconfig")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([found, *args], check=False, capture_output=True, text=True, env=env,
                              timeout=60)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    return run


@pytest.fixture(scope="session")
def rendered(helm):
    """values name → the rendered manifests (release "lf" in namespace "ml")."""
    out = {}
    for name, args in VALUES.items():
        text = helm("template", "lf", str(CHART), "--namespace", "ml", *args).stdout
        out[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    specs = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            specs[doc["metadata"]["name"]] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def containers(docs: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for spec in pod_specs(docs).values() for c in spec["containers"]}


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_strict(helm, values):
    helm("lint", "--strict", str(CHART), *VALUES[values])


@pytest.mark.parametrize("values", VALUES)
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(rendered, values):
    docs = rendered[values]
    kinds = sorted(doc["kind"] for doc in docs)
    expected = ["ConfigMap", "CronJob", "Deployment", "Deployment", "Role", "RoleBinding", "Service",
                "Service", "ServiceAccount"]
    if values == "all-on":
        expected = sorted(expected + ["Ingress", "NetworkPolicy", "NetworkPolicy"])
    assert kinds == expected
    for version in KUBE_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_validation_is_not_vacuous(rendered):
    deployment = copy.deepcopy(next(d for d in rendered["default"] if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize("values", VALUES)
def test_every_pod_runs_non_root_read_only_with_limits_and_a_writable_tmp(rendered, values):
    specs = pod_specs(rendered[values])
    assert len(specs) == 3
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] >= 1, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"], c["name"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in c["volumeMounts"])
            if not name.endswith("-retrain"):
                assert {"startupProbe", "readinessProbe", "livenessProbe"} <= c.keys(), c["name"]


def test_dockerfile_user_is_the_charts_default_uid(rendered):
    user = re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)[-1]
    assert {s["securityContext"]["runAsUser"] for s in pod_specs(rendered["default"]).values()} == {int(user)}


@pytest.mark.parametrize("values", VALUES)
def test_credentials_come_only_from_secrets(rendered, values):
    docs = rendered[values]
    assert "Secret" not in {d["kind"] for d in docs}, "the chart must not carry credentials"
    secret_like = re.compile(r"SECRET|PASSWORD|USERNAME|ACCESS_KEY|BACKEND_STORE_URI|_TOKEN$|_KEY$")
    seen = set()
    for c in containers(docs).values():
        for env in c.get("env", []):
            if secret_like.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], (c["name"], env)
                seen.add(env["name"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BACKEND_STORE_URI",
            "LESIONFLOW_RELOAD_TOKEN", "LESIONFLOW_PSEUDONYM_KEY"} <= seen
    if values == "all-on":
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= seen
    assert "postgresql://" not in yaml.safe_dump_all(docs)


def secret_env(container: dict) -> dict[str, dict]:
    """env name → its secretKeyRef, for the variables taken from a Secret."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("values", VALUES)
def test_reload_token_reaches_serving_and_pseudonym_key_reaches_retrain(rendered, values):
    """Each workload gets only the key it uses. The token is optional in the Secret (without it
    serving only disables /reload); the pseudonym key is not (a retrain without it would make
    pseudonyms the pipeline's ingest step cannot match)."""
    chosen = yaml.safe_load((ALL_ON if values == "all-on" else CHART / "values.yaml").read_text())["secrets"]
    serving, retrain = (secret_env(containers(rendered[values])[n]) for n in ("serving", "retrain"))
    assert serving["LESIONFLOW_RELOAD_TOKEN"] == {"name": chosen["existingSecret"],
                                                  "key": chosen["reloadTokenKey"], "optional": True}
    assert retrain["LESIONFLOW_PSEUDONYM_KEY"] == {"name": chosen["existingSecret"],
                                                   "key": chosen["pseudonymKeyKey"]}
    assert "LESIONFLOW_PSEUDONYM_KEY" not in serving and "LESIONFLOW_RELOAD_TOKEN" not in retrain


def test_without_a_keys_secret_no_pod_references_one(helm):
    out = helm("template", "lf", str(CHART), "--set", "secrets.existingSecret=").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for c in containers(docs).values():
        assert not {"LESIONFLOW_RELOAD_TOKEN", "LESIONFLOW_PSEUDONYM_KEY"} & set(secret_env(c)), c["name"]


def leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, node


def test_values_hold_no_credential(helm):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    credential_like = re.compile(r"(?i)password|secret|token|accesskey|username")
    for path, _ in leaves(values):
        key = path[-1]
        if credential_like.search(key):
            # Only references: the name of a Secret, or of a key inside one.
            assert key in {"existingSecret", "tlsSecret", "imagePullSecrets"} or key.endswith("Key"), path
    # The schema allows no extra key, so a credential cannot be slipped in as a value.
    proc = helm("template", "lf", str(CHART), "--set", "s3.credentials.secretAccessKey=hunter2", check=False)
    assert proc.returncode != 0 and "secretAccessKey is not allowed" in proc.stderr


@pytest.mark.parametrize("bad", [
    "runAsUser=0",
    "retrain.schedule=hourly",
    "image.pullPolicy=Sometimes",
    "retrain.minCorrections=0",
    "mlflow.service.port=70000",
    "s3.bucket=Not_A_Bucket",
    "secrets.existingSecret=Not_A_Secret",
])
def test_values_schema_rejects_bad_values(helm, bad):
    proc = helm("template", "lf", str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_external_mlflow_needs_a_tracking_uri(helm):
    proc = helm("template", "lf", str(CHART), "--set", "mlflow.enabled=false", check=False)
    assert proc.returncode != 0 and "mlflow.trackingUri is required" in proc.stderr
    proc = helm("template", "lf", str(CHART), "--set", "mlflow.enabled=false",
                "--set", "mlflow.trackingUri=https://mlflow.example.com")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert not any(d["metadata"]["name"].endswith("-mlflow") for d in docs)
    env = {e["name"]: e.get("value") for e in containers(docs)["serving"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"


@pytest.mark.parametrize("values", VALUES)
def test_rbac_is_least_privilege_and_only_retrain_gets_a_kfp_token(rendered, values):
    docs = rendered[values]
    role = next(d for d in docs if d["kind"] == "Role")
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["pipelines.kubeflow.org"]
        assert set(rule["resources"]) <= {"experiments", "runs"}
        assert set(rule["verbs"]) <= {"get", "list", "create"}
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ml"}]
    assert sa["automountServiceAccountToken"] is False
    token_volumes = {name: [v for v in spec["volumes"] if "projected" in v]
                     for name, spec in pod_specs(docs).items()}
    for name, volumes in token_volumes.items():
        if values == "all-on" and name.endswith("-retrain"):
            [source] = volumes[0]["projected"]["sources"]
            assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
            assert role["metadata"]["namespace"] == "kubeflow-user"
        else:
            assert volumes == [], name


def test_chart_image_is_the_compiled_pipeline_image(helm, rendered):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == lesionflow.__version__
    assert values["image"]["repository"] == lesionflow.IMAGE_REPOSITORY
    pipeline = next(yaml.safe_load_all(COMPILED.read_text()))  # 2nd document: platforms
    pipeline_images = {e["container"]["image"] for e in pipeline["deploymentSpec"]["executors"].values()}
    chart_images = {c["image"] for c in containers(rendered["default"]).values()}
    assert chart_images == pipeline_images == {f"{lesionflow.IMAGE_REPOSITORY}:{lesionflow.__version__}"}
    # One setting moves every workload (e.g. to the <version>-<gitsha> tag).
    assert {c["image"] for c in containers(rendered["all-on"]).values()} == {
        f"{lesionflow.IMAGE_REPOSITORY}:0.1.0-0123456789ab"}


def test_chart_secret_is_the_one_the_pipeline_steps_read():
    """One Secret serves the chart's workloads and the pipeline's steps (params.yaml cluster)."""
    cluster = config.load(REPO / "params.yaml").cluster
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    creds, auth = values["s3"]["credentials"], values["mlflow"]["auth"]
    assert creds["existingSecret"] == values["secrets"]["existingSecret"] == cluster.credentials_secret
    keys = {creds["accessKeyIdKey"], creds["secretAccessKeyKey"], auth["usernameKey"], auth["passwordKey"],
            values["secrets"]["pseudonymKeyKey"]}
    assert keys <= set(cluster.secret_env)


@pytest.mark.parametrize("values", VALUES)
def test_lesionflow_commands_parse_and_their_params_validate(rendered, values, tmp_path):
    """The serving and retrain command lines are valid lesionflow CLI calls, and the params they
    load (the image's params.yaml + the chart's ConfigMap + --set) pass lesionflow's validation."""
    docs = rendered[values]
    overrides = tmp_path / "params.yaml"
    overrides.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["params.yaml"])
    mlflow_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-mlflow"))
    expected_uri = f"http://{mlflow_service['metadata']['name']}.ml.svc:{mlflow_service['spec']['ports'][0]['port']}"
    for name in ("serving", "retrain"):
        c = containers(docs)[name]
        assert c["command"] == ["lesionflow"]
        args = cli.build_parser().parse_args(c["args"])
        assert args.params[0] == "/app/params.yaml"
        params = config.load([REPO / "params.yaml", overrides], args.set)
        assert params.runtime.mlflow_tracking_uri == expected_uri
        assert params.runtime.workdir.startswith("/tmp/")
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"] == expected_uri
        if name == "retrain":
            assert args.min_corrections >= 1 and args.host.startswith("http")
            assert params.runtime.dvc_remote.startswith("s3://")
    if values == "all-on":
        assert params.evaluate.threshold == 0.5


def test_mlflow_server_command_parses(rendered):
    from mlflow.cli import server

    c = containers(rendered["all-on"])["mlflow"]
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    ctx = server.make_context("server", list(c["args"][1:]))
    assert ctx.params["backend_store_uri"] == "$(MLFLOW_BACKEND_STORE_URI)"  # expanded by the kubelet
    assert ctx.params["artifacts_destination"] == "s3://lesionflow-prod/mlflow-artifacts"
    assert "mlflow.example.com" in ctx.params["allowed_hosts"].split(",")
    # The in-cluster name clients use must pass MLflow's Host-header check.
    assert "lf-mlflow.ml.svc:*" in ctx.params["allowed_hosts"].split(",")


def test_kserve_serves_the_champion_through_mlflow_instead_of_the_deployment(helm):
    """serving.kserve.enabled: an InferenceService in the MLflow model format, whose runtime is this
    image running `mlflow models serve` (of the champion alias, or of what storageUri fetched),
    replaces the Deployment, its Service and Ingress; its pod keeps every pod's guarantees and
    validates as a Kubernetes Pod (the CRDs themselves have no bundled schema)."""
    from mlflow.cli import cli as mlflow_cli

    storage = "s3://lesionflow-prod/mlflow-artifacts/1/models/m-1/artifacts"
    for values, uri in ((["--set", "serving.kserve.enabled=true"],
                         f"models:/{config.Params().runtime.model_name}@champion"),
                        (["-f", str(ALL_ON), "--set", "serving.kserve.enabled=true",
                          "--set", f"serving.kserve.storageUri={storage}"], "/mnt/models")):
        out = helm("template", "lf", str(CHART), "--namespace", "ml", *values).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        assert "Ingress" not in {d["kind"] for d in docs}
        assert not [d for d in docs if d["kind"] in ("Deployment", "Service")
                    and d["metadata"]["name"].endswith("-serving")]
        [runtime] = [d for d in docs if d["kind"] == "ServingRuntime"]
        [isvc] = [d for d in docs if d["kind"] == "InferenceService"]
        assert (runtime["apiVersion"], isvc["apiVersion"]) == ("serving.kserve.io/v1alpha1", "serving.kserve.io/v1beta1")
        predictor, model = isvc["spec"]["predictor"], isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] == "mlflow"
        assert {**model["modelFormat"], "autoSelect": False} in runtime["spec"]["supportedModelFormats"]
        assert model.get("storageUri") == (storage if uri == "/mnt/models" else None)
        [c] = runtime["spec"]["containers"]
        assert c["image"] == containers(docs)["retrain"]["image"]  # the one image
        assert c["command"] == ["mlflow"] and c["args"][:2] == ["models", "serve"]
        serve = mlflow_cli.commands["models"].commands["serve"].make_context("serve", list(c["args"][2:]))
        assert (serve.params["model_uri"], serve.params["env_manager"], serve.params["port"]) == (uri, "local", 8080)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
               "spec": {**{k: predictor[k] for k in ("serviceAccountName", "automountServiceAccountToken",
                                                     "securityContext")},
                        "containers": [{**c, "resources": model["resources"]}],
                        "volumes": runtime["spec"]["volumes"],
                        **{k: runtime["spec"][k] for k in ("imagePullSecrets",) if k in runtime["spec"]}}}
        for version in KUBE_VERSIONS:
            for doc in [d for d in docs if d["kind"] not in ("ServingRuntime", "InferenceService")] + [pod]:
                kubernetes_validate.validate(doc, version, strict=True)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
        assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
        mlflow_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-mlflow"))
        assert {e["name"]: e.get("value") for e in c["env"]}["MLFLOW_TRACKING_URI"] == (
            f"http://{mlflow_service['metadata']['name']}.ml.svc:{mlflow_service['spec']['ports'][0]['port']}")
        if "-f" in values:  # all-on: basic auth and S3 keys, from Secrets only
            assert {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= secret_env(c).keys()
            [policy] = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-serving")]
            assert policy["spec"]["podSelector"]["matchLabels"] == predictor["labels"]


def test_notes_name_the_secrets_to_create(helm, tmp_path):
    # `helm template` skips NOTES.txt and `helm install --dry-run` wants a cluster: render the
    # same text through `tpl` in a throwaway copy of the chart.
    chart = tmp_path / "lesionflow"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        "data: {notes: {{ tpl (.Files.Get \"notes.txt\") . | quote }}}\n")
    out = helm("template", "lf", str(chart), "-n", "ml", "-f", str(ALL_ON),
               "--show-only", "templates/notes.yaml").stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    for secret in ("mlflow-postgres", "s3-credentials", "mlflow-auth"):
        assert secret in notes
    assert 'lesionflow-keys: key "pseudonym-key"' in notes and '"reload-token"' in notes
    assert "lesionflow:0.1.0-0123456789ab" in notes
    assert "http://lf-mlflow.ml.svc:5000" in notes


@pytest.mark.slow
def test_mlflow_server_runs_with_the_charts_arguments(rendered, s3_server, s3_bucket, tmp_path):
    """`mlflow server` as the chart starts it (SQLite for PostgreSQL, moto for S3, loopback):
    in-cluster Host names pass MLflow's Host check, others don't, artifacts land in S3 through
    the server's proxy (what serving relies on), and nothing is written to the working directory
    (the root filesystem is read-only in the pod)."""
    import signal
    import urllib.error
    import urllib.request

    import boto3
    from mlflow import MlflowClient

    from tests.conftest import free_port, wait_http

    docs = rendered["default"]
    c = containers(docs)["mlflow"]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-mlflow"))
    name = service["metadata"]["name"]
    port = free_port()
    local = {"$(MLFLOW_BACKEND_STORE_URI)": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "s3://lesionflow/mlflow": f"s3://{s3_bucket}/mlflow", "0.0.0.0": "127.0.0.1",
             "5000": str(port)}
    args = [local.get(a, a) for a in c["args"]]
    args[args.index("--workers") + 1] = "1"  # startup time
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "MLFLOW_S3_ENDPOINT_URL": s3_server}
    proc = subprocess.Popen([shutil.which("mlflow"), *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=90, proc=proc)

        def status(host: str) -> int:
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                             headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as err:
                return err.code

        assert status(f"{name}.ml.svc:5000") == 200
        assert status(f"{name}.ml.svc.cluster.local:5000") == 200
        assert status("evil.example.com") != 200

        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("chart"))
        client.log_text(run.info.run_id, "hello", "note.txt")
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
                .list_objects_v2(Bucket=s3_bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
        assert list(cwd.iterdir()) == []
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
