"""Concurrency with real processes: the lease on the tracking server (``lesionflow.lease``) and
``corrections add`` from two reviewers at once. Workers are separate Python processes (as pods on
different nodes would be) that meet at a barrier file, against the real `mlflow server` fixture
and, where noted, a shared ``sqlite:///`` store."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from lesionflow import cli, config, corrections, lease, lineage, tracking
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import LeaseHeldError, LeaseLostError
from tests.conftest import REPO
from tests.test_corrections import make_batch, register_version

pytestmark = pytest.mark.slow
MODEL = "conc"

# A lease worker: holds `resource` for each (wait, hold) round and logs enter/exit times while
# holding; a refusal is logged with its message.
LEASE_WORKER = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
import mlflow
mlflow.set_tracking_uri(args["uri"]); mlflow.set_registry_uri(args["uri"])
from lesionflow import lease
from lesionflow.errors import LeaseHeldError

def log(*words):
    with open(args["log"], "a") as f:
        f.write(" ".join(map(str, words)) + "\n")

log("ready", args["holder"])
while args["barrier"] and not os.path.exists(args["barrier"]):
    time.sleep(0.005)
for wait, hold in args["rounds"]:
    try:
        with lease.held(args["model"], args["resource"], args["holder"], ttl=args["ttl"], wait=wait,
                        release=args["release"],
                        owner=lease.process_identity() if args["own"] else None) as held:
            log("enter", args["holder"], held.ticket, time.time())
            time.sleep(hold)
            log("exit", args["holder"], held.ticket, time.time())
    except LeaseHeldError as e:
        log("refused", args["holder"], "-", e)
"""

# `lesionflow corrections add`, with the heavy imports done before the barrier so that both
# processes really reach the corrections lease at the same moment.
CLI_WORKER = r"""
import os, sys, time
from lesionflow import cli, corrections
with open(sys.argv[2], "a") as f:
    f.write("ready\n")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
sys.exit(cli.main(sys.argv[3:]))
"""


@contextmanager
def mlflow_at(uri: str):
    """Tracking and registry at ``uri``, both put back afterwards (see test_registry.tracking_uri)."""
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(old["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(old["MLFLOW_REGISTRY_URI"])
        if old["MLFLOW_REGISTRY_URI"] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture
def server(mlflow_server):
    with mlflow_at(mlflow_server.url) as uri:
        yield uri


@pytest.fixture(params=["http", "sqlite"])
def store(request, tmp_path):
    """The real server, or one SQLite file shared by all processes (created here first: MLflow's
    schema migration itself is not safe to run from several processes at once)."""
    if request.param == "http":
        uri = request.getfixturevalue("mlflow_server").url
    else:
        uri = f"sqlite:///{tmp_path / 'shared.db'}"
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    with mlflow_at(uri):
        yield uri


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lease_worker(uri: str, resource: str, holder: str, log: Path, rounds, *, ttl: float,
                 barrier: Path | None = None, release: bool = True, own: bool = False) -> subprocess.Popen:
    """``own``: the worker process is the owner of its tickets (as a ``lesionflow run`` driver is)."""
    args = {"uri": uri, "model": MODEL, "resource": resource, "holder": holder, "log": str(log),
            "rounds": rounds, "ttl": ttl, "barrier": str(barrier) if barrier else None,
            "release": release, "own": own}
    return spawn(LEASE_WORKER, json.dumps(args))


def lines(log: Path) -> list[list[str]]:
    return [line.split(" ", 3) for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(log: Path, what: str, count: int = 1, timeout: float = 60, procs=()) -> list[list[str]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [line for line in lines(log) if line[0] == what]
        if len(found) >= count:
            return found
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"worker failed:\n{p.stdout.read()}")
        time.sleep(0.05)
    raise TimeoutError(f"{count}× {what!r} not in {log} after {timeout}s: {log.read_text()}")


def finish(*procs: subprocess.Popen, timeout: float = 90) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out


def test_racing_processes_hold_the_lease_one_at_a_time(store, tmp_path):
    """(b) Two processes released together: with wait=0 exactly one gets it and the other is told
    who holds it; then, waiting, they take turns, including holds longer than the ttl (kept
    alive by the heartbeat)."""
    log, barrier, ttl = tmp_path / "log", tmp_path / "go", 3.0
    rounds = {"p1": [(0, 1.5), (30, ttl + 1.0), (30, 0.2)], "p2": [(0, 1.5), (30, 0.2), (30, 0.2)]}
    procs = [lease_worker(store, "race", h, log, r, ttl=ttl, barrier=barrier) for h, r in rounds.items()]
    wait_for(log, "ready", 2, procs=procs)
    barrier.touch()
    finish(*procs)

    events = lines(log)
    refused = [e for e in events if e[0] == "refused"]
    assert len(refused) == 1, events
    first = next(e for e in events if e[0] == "enter")
    assert first[1] != refused[0][1]
    assert f"is held by {first[1]} (ticket {first[2]}) since" in refused[0][3]
    assert "expiring at" in refused[0][3] and "Retry once it is released" in refused[0][3]
    # never two holders at once: each enter comes after the previous holder's exit
    spans = {}
    for kind, holder, ticket, when in (e for e in events if e[0] in ("enter", "exit")):
        spans.setdefault((holder, int(ticket)), {})[kind] = float(when)
    ordered = sorted(spans.values(), key=lambda s: s["enter"])
    assert len(ordered) == sum(map(len, rounds.values())) - 1
    assert all(a["exit"] <= b["enter"] for a, b in zip(ordered, ordered[1:])), ordered
    assert lease.current(MODEL, "race") is None


def test_a_killed_holder_is_taken_over_once_its_ttl_has_passed(server, tmp_path):
    """(c) SIGKILL the holder: a waiting process gets the lease after the last heartbeat + ttl
    (server time), not before, and revokes the dead ticket."""
    log, barrier, ttl = tmp_path / "log", tmp_path / "go", 3.0
    holder = lease_worker(server, "kill", "doomed", log, [(0, 600)], ttl=ttl)
    waiter = lease_worker(server, "kill", "heir", log, [(30, 0)], ttl=ttl, barrier=barrier)
    doomed_ticket = int(wait_for(log, "enter", procs=[holder])[0][2])
    wait_for(log, "ready", 2, procs=[holder, waiter])
    barrier.touch()
    time.sleep(1.5)  # the heir is queued behind the live holder by now
    assert [e[1] for e in lines(log) if e[0] == "enter"] == ["doomed"]
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    assert lease.current(MODEL, "kill").holder == "doomed"  # until it expires

    heir = wait_for(log, "enter", 2, timeout=30, procs=[waiter])[1]
    finish(waiter)
    taken_at = float(heir[3])
    dead = MlflowClient().get_model_version(lease.model_name(MODEL, "kill"), str(doomed_ticket))
    assert taken_at * 1000 >= dead.last_updated_timestamp + ttl * 1000
    assert taken_at < killed_at + ttl + 5
    assert dead.tags[lease.TAG_REVOKED_BY] == heir[2]


def test_a_dead_owner_on_this_host_is_taken_over_at_once(server, tmp_path):
    """A holder whose owner process is gone from this host (SIGKILL) is revoked by the next
    acquire without waiting out the ttl; a live owner still blocks."""
    log, ttl = tmp_path / "log", 600.0
    holder = lease_worker(server, "dead", "doomed", log, [(0, 600)], ttl=ttl, own=True)
    doomed_ticket = int(wait_for(log, "enter", procs=[holder])[0][2])
    with pytest.raises(LeaseHeldError, match="held by doomed"):
        lease.acquire(MODEL, "dead", "heir", ttl=ttl)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lease.current(MODEL, "dead") is None  # the advisory check knows it is dead too

    started = time.monotonic()
    heir = lease.acquire(MODEL, "dead", "heir", ttl=ttl)
    assert time.monotonic() - started < 10  # not the 600 s ttl
    assert heir.took_over == ["doomed"]
    dead = MlflowClient().get_model_version(lease.model_name(MODEL, "dead"), str(doomed_ticket))
    assert dead.tags[lease.TAG_REVOKED_BY] == str(heir.ticket)
    heir.release()


def test_the_same_holder_gets_its_ticket_back_in_another_process(server, tmp_path):
    """(d) Like meta_train then register: one process takes the lease and exits without releasing;
    another process with the same holder id gets the same ticket, anyone else is refused."""
    log = tmp_path / "log"
    finish(lease_worker(server, "train", "pipeline-run-42", log, [(0, 0)], ttl=30, release=False))
    first_ticket = int(wait_for(log, "enter")[0][2])
    assert lease.current(MODEL, "train").holder == "pipeline-run-42"

    again = lease.acquire(MODEL, "train", "pipeline-run-42", ttl=30)
    assert again.ticket == first_ticket
    with pytest.raises(LeaseHeldError, match="held by pipeline-run-42"):
        lease.acquire(MODEL, "train", "pipeline-run-43", ttl=30)
    again.release()
    assert lease.current(MODEL, "train") is None
    other = lease.acquire(MODEL, "train", "pipeline-run-43", ttl=30)
    assert other.ticket > first_ticket
    other.release()


def test_a_holder_that_expired_and_was_taken_over_finds_out(server, tmp_path, monkeypatch):
    """(e) A holder whose heartbeat stalled past the ttl while another process took over: renew,
    check and leaving ``held`` all raise LeaseLostError; acquiring again with that holder id too."""
    log = tmp_path / "log"
    monkeypatch.setattr(lease, "_heartbeat", lambda lease, stop: None)  # a stalled heartbeat
    with pytest.raises(LeaseLostError, match="took it over"):
        with lease.held(MODEL, "stall", "stalled", ttl=2) as stalled:
            taker = lease_worker(server, "stall", "taker", log, [(30, 0)], ttl=2)
            taken = wait_for(log, "enter", procs=[taker])[0]
            finish(taker)
            with pytest.raises(LeaseLostError, match=f"ticket {taken[2]} took it over"):
                stalled.renew()
            with pytest.raises(LeaseLostError, match="Work done under it must not be committed"):
                stalled.check()
    with pytest.raises(LeaseLostError, match="start again with a new holder id"):
        lease.acquire(MODEL, "stall", "stalled", ttl=2)


@pytest.fixture
def corrections_params(server, tmp_path):
    """What one pod sees: its own workdir, the shared tracking server and DVC remote."""
    def params(pod: str, model: str = "conc-corrections"):
        return config.load(REPO / "params.yaml", [
            f"runtime.workdir={tmp_path / pod}", f"runtime.model_name={model}",
            f"runtime.mlflow_tracking_uri={server}", f"runtime.dvc_remote={tmp_path / 'remote'}"])
    return params


def test_two_reviewers_adding_at_once_both_land_in_the_newest_version(corrections_params, tmp_path):
    """(a) Two `lesionflow corrections add` processes released at the same moment: the second
    waits for the first's lease, so the newest version holds both batches. Reviewer provenance:
    --reviewer, or the CSV's reviewer column per row."""
    params = corrections_params("test")
    tracking.connect(params)
    v1 = register_version(params)
    make_batch(tmp_path / "b1", {"a": 1, "b": 2})
    b2 = make_batch(tmp_path / "b2", {"c": 3, "d": 4})
    with open(b2 / corrections.CSV, "w", newline="") as f:
        csv.writer(f).writerows([["id", "model_version", "reviewer"], ["c", v1, "carol"], ["d", v1, ""]])

    ready, barrier = tmp_path / "ready", tmp_path / "go"
    procs = [spawn(CLI_WORKER, str(barrier), str(ready), "corrections", "add",
                   "--params", str(REPO / "params.yaml"),
                   "--set", f"runtime.workdir={tmp_path / pod}",
                   "--set", "runtime.model_name=conc-corrections",
                   "--set", f"runtime.mlflow_tracking_uri={params.runtime.mlflow_tracking_uri}",
                   "--set", f"runtime.dvc_remote={params.runtime.dvc_remote}",
                   "--source", str(tmp_path / batch), "--model-version", v1, "--reviewer", reviewer)
             for pod, batch, reviewer in (("pod1", "b1", "alice"), ("pod2", "b2", "bob"))]
    wait_for(ready, "ready", 2, procs=procs)
    barrier.touch()
    finish(*procs)

    newest = corrections.latest(params)
    assert newest.n_corrections == 4
    records = {r.id: r for r in read_manifest(corrections.restore(params, newest.md5, tmp_path / "r"))}
    assert sorted(records) == ["correction-a", "correction-b", "correction-c", "correction-d"]
    assert {i: r.labelled_by for i, r in records.items()} == {
        "correction-a": "reviewer:alice", "correction-b": "reviewer:alice",
        "correction-c": "reviewer:carol", "correction-d": "reviewer:bob"}
    assert {r.corrected_from for r in records.values()} == {v1}
    runs = corrections._runs(params, "attributes.status = 'FINISHED'", max_results=10)
    assert len(runs) == 2 and runs[0].info.run_id == newest.run_id
    assert sorted(r.data.tags[lineage.TAG_REVIEWER] for r in runs) == ["alice", "bob, carol"]
    assert lease.current("conc-corrections", corrections.LEASE) is None  # both released


def test_an_add_that_cannot_get_the_lease_fails_cleanly(corrections_params, tmp_path, monkeypatch,
                                                        capsys):
    """An add that times out waiting for the lease raises LeaseHeldError naming the holder,
    records nothing, and the CLI says so; the default reviewer is LESIONFLOW_USER."""
    params = corrections_params("pod", model="corr-timeout")
    tracking.connect(params)
    v1 = register_version(params)
    stuck = lease.acquire("corr-timeout", corrections.LEASE, "a stuck add", ttl=60)
    monkeypatch.setattr(corrections, "LEASE_WAIT", 0.5)
    batch = make_batch(tmp_path / "b", {"a": 1})
    with pytest.raises(LeaseHeldError, match="held by a stuck add .* expiring at"):
        corrections.add(params, str(batch), model_version=v1)
    args = ["--params", str(REPO / "params.yaml"), "--set", f"runtime.workdir={params.runtime.workdir}",
            "--set", "runtime.model_name=corr-timeout",
            "--set", f"runtime.mlflow_tracking_uri={params.runtime.mlflow_tracking_uri}",
            "--set", f"runtime.dvc_remote={params.runtime.dvc_remote}"]
    assert cli.main(["corrections", "add", *args, "--source", str(batch), "--model-version", v1]) == 2
    err = capsys.readouterr().err
    assert "LeaseHeldError: the 'corrections' lease of corr-timeout is held by a stuck add" in err
    assert mlflow.get_experiment_by_name(corrections.experiment_name(params)) is None  # no run at all

    stuck.release()
    monkeypatch.setenv("LESIONFLOW_USER", "ci-bot")
    version = corrections.add(params, str(batch), model_version=v1)
    restored = read_manifest(corrections.restore(params, version.md5, tmp_path / "r"))
    assert [r.labelled_by for r in restored] == ["reviewer:ci-bot"]
    assert MlflowClient().get_run(version.run_id).data.tags[lineage.TAG_REVIEWER] == "ci-bot"
