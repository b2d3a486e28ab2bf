"""Faults with real processes: a `lesionflow run` SIGKILLed during meta_train and during register,
the MLflow server down before a run and killed in the middle of one, the S3 server killed during
`dvc push`. After each, a rerun completes and nothing stored is lost, half-written or unexplained."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow import MlflowClient

from lesionflow import lineage, registry
from lesionflow.errors import RemoteUnavailableError
from lesionflow.versioning import restore_dataset, version_dataset
from tests.conftest import (
    REPO,
    free_port,
    start_mlflow_server,
    stop_process_group,
    wait_http,
)
from tests.test_pipeline import TINY

pytestmark = pytest.mark.slow
MODEL = "faulty"
# The kill points are meta_train and register: the steps before them only need to run.
FAST = ["video.enabled=false", "synthetic.n_weak=0", "train.epochs=2"]


class Server:
    """A tracking server that can be killed and brought back on the same store and port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_mlflow_server(root, self.port)

    def kill(self) -> None:
        stop_process_group(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.proc = start_mlflow_server(self.root, self.port)

    def query(self, sql: str, *args) -> list[tuple]:
        """Read the server's store directly: fast enough to catch a version the moment it exists."""
        for _ in range(50):
            try:
                with sqlite3.connect(f"file:{self.root / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
                    return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError:  # locked by a writer, or not created yet
                time.sleep(0.01)
        raise TimeoutError(f"cannot read {self.root / 'mlflow.db'}")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    tracking = Server(root)
    yield tracking
    stop_process_group(tracking.proc)


def start_run(workdir: Path, server: Server, *extra: str) -> subprocess.Popen:
    """`lesionflow run` in its own process group (so a SIGKILL takes its step subprocesses too)."""
    sets = [f"runtime.workdir={workdir}", f"runtime.mlflow_tracking_uri={server.url}",
            f"runtime.model_name={MODEL}", "runtime.service_wait_seconds=5", *TINY, *FAST, *extra]
    cmd = [sys.executable, "-m", "lesionflow.cli", "run", "--params", str(REPO / "params.yaml")]
    cmd += [arg for item in sets for arg in ("--set", item)]
    log = workdir.parent / f"run-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def wait_until(condition, timeout: float, proc: subprocess.Popen, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill point:\n"
                                 f"{output(proc)[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"kill point not reached in {timeout}s")
        time.sleep(poll)


def kill_run(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    return proc.wait(timeout=timeout)


def step_running(server: Server, step: str) -> bool:
    return bool(server.query(
        "select 1 from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = ? and t.value = ? and r.status = 'RUNNING'", lineage.TAG_STEP, step))


def n_versions(server: Server) -> int:
    return server.query("select count(*) from model_versions where name = ?", MODEL)[0][0]


def assert_consistent(server: Server, workdir: Path) -> None:
    """What a killed run must never leave behind, checked through the tracking server."""
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    mlflow.set_tracking_uri(server.url)
    mlflow.set_registry_uri(server.url)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert versions
    for mv in versions:
        tags = mv.tags
        missing = [k for k in (*lineage.REQUIRED, lineage.TAG_GIT_COMMIT, lineage.TAG_GATE) if not tags.get(k)]
        assert not missing, f"v{mv.version} lacks {missing}"
        assert tags[lineage.TAG_REGISTRATION] in (lineage.REGISTRATION_COMPLETE, lineage.REGISTRATION_INTERRUPTED)
    history = registry.history(MODEL)
    decided = {m.candidate if m.action == "refuse" else m.to_version for m in history
               if m.action in ("promote", "refuse")}
    assert decided >= {str(mv.version) for mv in versions}, "a version without a gate decision"
    stack = registry._champion_stack(MODEL)
    assert registry.champion_version(MODEL) == stack[-1]
    assert registry._alias_version(MODEL, "challenger") == max((str(v.version) for v in versions), key=int)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.status = 'RUNNING'")
    assert not runs, f"runs left RUNNING: {[r.info.run_name for r in runs]}"
    md5s = {r.data.tags[tag] for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            for tag in lineage.DATASET_TAGS.values() if tag in r.data.tags}
    assert md5s
    for i, md5 in enumerate(sorted(md5s)):  # every dataset version any run recorded restores
        restore_dataset(md5, workdir.parent / "restored" / str(i), remote=str(workdir / "dvc-remote"))


def test_runs_killed_during_meta_train_and_register_lose_nothing(tmp_path, server):
    workdir = tmp_path / "work"
    first = start_run(workdir, server)
    wait_until(lambda: step_running(server, "meta_train"), 600, first, poll=0.2)
    time.sleep(1.0)  # inside the training loop
    kill_run(first)
    assert n_versions(server) == 0

    second = start_run(workdir, server)  # the dead run's lease is taken over at once
    wait_until(lambda: n_versions(server) >= 1, 900, second, poll=0.002)
    kill_run(second)  # the version exists; its alias moves and history have not all happened

    third = start_run(workdir, server)
    assert finish(third) == 0, output(third)[-4000:]
    assert "recovered" in output(third) or "interrupted" in output(third), output(third)[-2000:]
    assert n_versions(server) == 2
    assert_consistent(server, workdir)


def test_tracking_server_down_then_killed_mid_run(tmp_path, server):
    workdir = tmp_path / "work"
    server.kill()
    started = time.monotonic()
    down = start_run(workdir, server)
    assert finish(down, timeout=300) != 0
    said = output(down)
    assert f"MLflow tracking server at {server.url} is unavailable" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert time.monotonic() - started < 120

    server.restart()
    broken = start_run(workdir, server)
    wait_until(lambda: step_running(server, "pseudo_label"), 600, broken, poll=0.2)
    server.kill()
    assert finish(broken, timeout=600) != 0
    said = output(broken)
    assert f"MLflow tracking server at {server.url} is unavailable" in said, said[-3000:]

    server.restart()
    rerun = start_run(workdir, server)
    assert finish(rerun) == 0, output(rerun)[-4000:]
    assert_consistent(server, workdir)


class Outage:
    """A TCP relay in front of a server: ``cut()`` drops every connection and refuses new ones
    until ``restore()`` (a network outage with the server's state intact)."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port = target_port, free_port()
        self.up = threading.Event()
        self.up.set()
        self.live: list[socket.socket] = []
        self.accepted = 0  # connections clients have opened (a push has begun once this grows)
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        for conn in self.live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self.live.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server behind is down: the client sees its connection closed
                client.close()
                continue
            self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


def test_s3_outage_during_dvc_push_is_retried_then_named(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    moto_bin = str(Path(sys.executable).parent / "moto_server")

    def start_moto() -> subprocess.Popen:
        proc = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/moto-api/", timeout=30, proc=proc)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="lesions")
        return proc

    dataset = tmp_path / "ds"
    dataset.mkdir()
    for i in range(400):
        (dataset / f"f{i:03d}.bin").write_bytes(os.urandom(16_000))
    moto = start_moto()
    network = Outage(port)
    endpoint = f"http://127.0.0.1:{network.port}"
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")

    # 1. The store drops out for 3 s in the middle of `dvc push`: the same call retries and lands it.
    outcome: dict = {}
    pusher = threading.Thread(target=lambda: outcome.update(version=version_dataset(
        dataset, remote="s3://lesions/dvc", endpoint_url=endpoint, retry_seconds=60)))
    pusher.start()
    deadline = time.monotonic() + 120
    while not s3.list_objects_v2(Bucket="lesions").get("KeyCount"):  # the push has begun
        assert time.monotonic() < deadline and pusher.is_alive(), "dvc push never started"
        time.sleep(0.05)
    network.cut()
    time.sleep(3)
    network.restore()
    pusher.join(timeout=300)
    version = outcome["version"]
    restore_dataset(version.md5, tmp_path / "back", remote="s3://lesions/dvc", endpoint_url=endpoint)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(p.name for p in dataset.iterdir())

    # 2. The S3 server process is killed during a push and stays down: a named error in bounded time.
    (dataset / "new.bin").write_bytes(os.urandom(2_000_000))
    failure: dict = {}

    def doomed() -> None:
        try:
            version_dataset(dataset, remote="s3://lesions/dvc", endpoint_url=endpoint, retry_seconds=5)
        except Exception as err:  # noqa: BLE001 — asserted below
            failure["error"] = err

    opened = network.accepted
    pusher = threading.Thread(target=doomed)
    pusher.start()
    while network.accepted == opened:  # dvc is talking to S3
        assert pusher.is_alive(), f"the push ended before it reached S3: {failure}"
        time.sleep(0.01)
    stop_process_group(moto, signal.SIGKILL)
    pusher.join(timeout=300)
    assert isinstance(failure.get("error"), RemoteUnavailableError), failure
    assert f"s3://lesions/dvc (endpoint {endpoint})" in str(failure["error"])

    # 3. It comes back (empty: moto keeps nothing): the rerun pushes everything again and completes.
    moto = start_moto()
    try:
        again = version_dataset(dataset, remote="s3://lesions/dvc", endpoint_url=endpoint, retry_seconds=30)
        restore_dataset(again.md5, tmp_path / "again", remote="s3://lesions/dvc", endpoint_url=endpoint)
        assert (tmp_path / "again" / "new.bin").read_bytes() == (dataset / "new.bin").read_bytes()
    finally:
        network.cut()
        stop_process_group(moto, signal.SIGKILL)


def test_mlflow_before_connect_is_named_and_writes_nothing(tmp_path):
    """MLflow's default store would be ./mlflow.db of the current folder (that is how one got
    committed once); before ``tracking.connect`` every MLflow call is refused instead."""
    code = ("from lesionflow import registry\n"
            "from lesionflow.errors import TrackingNotConnectedError\n"
            "try:\n    registry.champion_version('x')\n"
            "except TrackingNotConnectedError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, check=True)
    assert "refused: MLflow was used before" in proc.stdout, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
