"""Registry: lineage on versions, the gate, alias history in the tracking server, rollback, loading.

Most tests share one temporary `sqlite:///` store (each with its own model name); one test runs the
whole story against a real `mlflow server` over HTTP.
"""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from lesionflow import lineage
from lesionflow import registry as reg
from lesionflow.errors import RegistryError
from lesionflow.models.pyfunc import confidence, decode_rle
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.unet import UNet

LINEAGE = {
    lineage.TAG_DATASET_MD5: "d41d8cd98f00b204e9800998ecf8427e",
    lineage.TAG_PARAMS_HASH: "p-123",
    lineage.TAG_PIPELINE_RUN_ID: "kfp-run-1",
}
X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255


@contextmanager
def tracking_uri(uri: str):
    """Point MLflow's tracking *and* registry at ``uri`` and put back both as they were. The
    registry URI must be set too: otherwise registry calls go wherever MLFLOW_REGISTRY_URI points,
    e.g. a store an earlier ``tracking.connect`` left behind (``set_registry_uri(None)`` does not
    clear that variable, hence the explicit pop)."""
    old_tracking = os.environ.get("MLFLOW_TRACKING_URI")
    old_registry = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)
        if old_registry is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store and an experiment whose artifacts stay under tmp; yields its id."""
    root = tmp_path_factory.mktemp("registry")
    with tracking_uri(f"sqlite:///{root / 'mlflow.db'}"):
        yield MlflowClient().create_experiment("train", artifact_location=(root / "artifacts").as_uri())


@pytest.fixture
def name(store, request):
    return "lesion-" + request.node.name.replace("_", "-")


def make_model(seed: int) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(UNet(3, 4, 1), 16, mean=[100.0] * 3, std=[50.0] * 3).eval()


def register(exp_id: str, name: str, seed: int, dice: float, **lineage: str) -> tuple[str, Segmenter]:
    model = make_model(seed)
    with mlflow.start_run(experiment_id=exp_id):
        version = reg.register_model(model, name=name, lineage={**LINEAGE, **lineage}, metrics={"dice": dice})
    return version, model


def test_code_version_is_the_checkout_with_a_dirty_flag_else_the_image_sha(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "code.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("LESIONFLOW_GIT_SHA", "baked-sha")
    (repo / "untracked.txt").write_text("not code")  # untracked files don't make the code dirty
    assert lineage.code_version(repo) == (head, False)
    (repo / "code.py").write_text("x = 2\n")
    assert lineage.code_version(repo) == (head, True)
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert lineage.code_version(outside) == ("baked-sha", False)
    monkeypatch.delenv("LESIONFLOW_GIT_SHA")
    assert lineage.code_version(outside) == ("unknown", False)


def overall(**metrics: float) -> dict[str, dict[str, float]]:
    return {"overall": {"n": 10, **metrics}}


def test_gate_thresholds_and_reasons():
    first = reg.gate(overall(dice=0.6), None)
    assert first.promote and first.champion is None and "0.6000" in first.reason
    # exactly at champion - tolerance is still promoted (binary-exact numbers, no float fuzz)
    edge = reg.gate(overall(dice=0.5), overall(dice=0.75), tolerance=0.25)
    assert edge.promote and (edge.candidate, edge.champion) == (0.5, 0.75)
    worse = reg.gate(overall(dice=0.70), overall(dice=0.80), tolerance=0.05)
    assert not worse.promote
    assert "0.7000" in worse.reason and "0.8000" in worse.reason and "0.0500" in worse.reason
    assert reg.gate(overall(iou=0.9), overall(iou=0.5), metric="iou").promote
    with pytest.raises(RegistryError, match="'dice' missing from candidate"):
        reg.gate(overall(iou=0.9), None)
    with pytest.raises(RegistryError, match="'dice' missing from champion"):
        reg.gate(overall(dice=0.9), overall(iou=0.5))


def test_gate_refuses_a_lesion_type_regression_the_mean_hides():
    """Better on average, much worse on the rare type: refused (seed 003's per-type decision),
    unless the type has too few compared records to judge alone."""
    champion = {"overall": {"n": 40, "dice": 0.80}, "benign": {"n": 36, "dice": 0.80},
                "malignant": {"n": 4, "dice": 0.80}}
    candidate = {"overall": {"n": 40, "dice": 0.82}, "benign": {"n": 36, "dice": 0.85},
                 "malignant": {"n": 4, "dice": 0.60}}
    refused = reg.gate(candidate, champion, max_type_drop=0.05, min_type_records=3)
    assert not refused.promote and len(refused.refusals) == 1
    assert refused.refusals[0].startswith("malignant: candidate dice=0.6000 < champion 0.8000")
    assert reg.gate(candidate, champion, max_type_drop=0.05, min_type_records=5).promote
    assert reg.gate(candidate, champion, max_type_drop=0.25, min_type_records=3).promote
    both = reg.gate({**candidate, "overall": {"n": 40, "dice": 0.70}}, champion, max_type_drop=0.05)
    assert not both.promote and len(both.refusals) == 2


def test_register_records_lineage_metrics_and_parent(store, name, monkeypatch):
    v1, _ = register(store, name, seed=1, dice=0.7)
    assert v1 == "1"
    info = reg.version_info(name, v1)
    assert info["tags"][lineage.TAG_PARENT_VERSION] == "none"
    # the code that ran: this checkout's HEAD, wherever the process was started
    assert info["tags"][lineage.TAG_GIT_COMMIT] == lineage.code_version(lineage.package_dir())[0]
    assert info["tags"][lineage.TAG_GIT_DIRTY] in ("true", "false")
    assert info["tags"][lineage.TAG_DATASET_MD5] == LINEAGE[lineage.TAG_DATASET_MD5]
    assert reg.version_metrics(name, v1) == {"dice": 0.7}
    run_tags = MlflowClient().get_run(info["run_id"]).data.tags
    assert run_tags[lineage.TAG_PIPELINE_RUN_ID] == "kfp-run-1" and float(run_tags[lineage.METRIC_TAG_PREFIX + "dice"]) == 0.7

    reg.move_alias(name, "champion", v1, why="first", action="promote")
    v2, _ = register(store, name, seed=2, dice=0.8, **{lineage.TAG_GIT_COMMIT: "explicit"})
    info2 = reg.version_info(name, v2)
    assert info2["tags"][lineage.TAG_PARENT_VERSION] == "1"
    assert info2["tags"][lineage.TAG_GIT_COMMIT] == "explicit"
    assert reg.version_info(name, v1)["aliases"] == ["champion"] and info2["aliases"] == []


def test_register_refuses_without_run_or_lineage(store, name):
    with pytest.raises(RegistryError, match="active MLflow run"):
        reg.register_model(make_model(0), name=name, lineage=LINEAGE, metrics={})
    with mlflow.start_run(experiment_id=store):
        partial = {k: v for k, v in LINEAGE.items() if k != lineage.TAG_PARAMS_HASH}
        with pytest.raises(RegistryError, match=lineage.TAG_PARAMS_HASH):
            reg.register_model(make_model(0), name=name, lineage=partial, metrics={})
        with pytest.raises(RegistryError, match="lesionflow.typo"):
            reg.register_model(make_model(0), name=name, lineage={**LINEAGE, "lesionflow.typo": "x"}, metrics={})
    assert reg._versions(name) == []


def test_history_rollback_stack(store, name, monkeypatch):
    versions = [register(store, name, seed=s, dice=0.5 + s / 10)[0] for s in (1, 2, 3)]
    monkeypatch.setenv("LESIONFLOW_USER", "alice")
    for v in versions:
        reg.move_alias(name, "champion", v, why=f"gate passed v{v}", action="promote")
    reg.move_alias(name, "challenger", "1", why="shadow test", action="set")  # other aliases don't count
    assert reg.champion_version(name) == "3" and reg.previous_champion(name) == "2"

    back = reg.rollback(name, why="v3 drifts")
    assert (back.from_version, back.to_version, back.action) == ("3", "2", "rollback")
    assert reg.rollback(name).to_version == "1"  # twice from v3 lands on v1
    assert reg.champion_version(name) == "1"
    with pytest.raises(RegistryError, match="no earlier champion to roll back to"):
        reg.rollback(name)

    hist = reg.history(name)
    assert [(m.action, m.from_version, m.to_version) for m in hist] == [
        ("promote", None, "1"), ("promote", "1", "2"), ("promote", "2", "3"),
        ("rollback", "3", "2"), ("rollback", "2", "1"),
    ]
    assert hist[0].why == "gate passed v1" and hist[3].why == "v3 drifts"
    assert {m.who for m in hist} == {"alice"} and {m.model for m in hist} == {name}
    now = datetime.now(UTC)
    assert all(now - timedelta(minutes=5) < datetime.fromisoformat(m.when) <= now for m in hist)
    assert [(m.alias, m.to_version) for m in reg.history(name, "challenger")] == [("challenger", "1")]


def test_rollback_to_named_version_and_undo(store, name):
    for s in (1, 2, 3):
        v, _ = register(store, name, seed=s, dice=0.5)
        reg.move_alias(name, "champion", v, why="promote", action="promote")
    assert reg.rollback(name, "1", why="back to the first").to_version == "1"
    # the stack is now [1]: there is nothing older than v1
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.previous_champion(name)
    v4, _ = register(store, name, seed=4, dice=0.5)
    # rolling "back" to a version never champion pushes it, so a plain rollback undoes that
    reg.rollback(name, v4)
    assert reg.previous_champion(name) == "1"
    assert reg.rollback(name).to_version == "1"


def test_rollback_refuses_when_alias_moved_outside(store, name):
    for s in (1, 2):
        v, _ = register(store, name, seed=s, dice=0.5)
        reg.move_alias(name, "champion", v, why="promote", action="promote")
    MlflowClient().set_registered_model_alias(name, "champion", "1")  # behind the registry's back
    with pytest.raises(RegistryError, match="moved outside"):
        reg.rollback(name)
    assert reg.rollback(name, "2").to_version == "2"


def test_unknown_versions_and_aliases_are_named(store, name):
    register(store, name, seed=1, dice=0.5)
    register(store, name, seed=2, dice=0.5)
    with pytest.raises(RegistryError, match=r"no version '7'; existing versions: 1, 2"):
        reg.move_alias(name, "champion", "7", why="typo", action="promote")
    assert reg.history(name) == [] and reg.champion_version(name) is None
    with pytest.raises(RegistryError, match=r"no version '9'"):
        reg.load_model(name, "9")
    with pytest.raises(RegistryError, match=r"no alias 'champion'; existing aliases: none"):
        reg.load_model(name, "champion")
    with pytest.raises(RegistryError, match="no registered model named 'ghost'"):
        reg.load_model("ghost", "champion")
    with pytest.raises(RegistryError, match="must be one of"):
        reg.move_alias(name, "champion", "1", why="x", action="demote")
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback(name)


def test_version_is_a_pyfunc_over_weights_with_processing_inside(store, name):
    """The registered artifact is weights + hyper-parameters (no pickled module) and its pyfunc
    answers encoded image bytes with a mask at the image's own size, equal to the in-memory model."""
    version, model = register(store, name, seed=5, dice=0.5)
    uri = f"models:/{name}/{version}"
    assert set(mlflow.models.get_model_info(uri).flavors) == {"python_function"}
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(uri)).rglob("*")}
    assert "segmenter.pt" in files and not {"model.pth", "data"} & files

    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [buf.getvalue()]}))
    prob = model.predict_proba([image])[0]
    mask = decode_rle(out["mask"][0])
    assert mask.shape == (24, 40) and np.array_equal(mask, prob > 0.5)
    assert out["confidence"][0] == pytest.approx(confidence(prob, prob > 0.5), abs=1e-6)


def test_versions_pickled_before_the_pyfunc_switch_still_load(store, name):
    model = make_model(6)
    with mlflow.start_run(experiment_id=store):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    version = mlflow.register_model(info.model_uri, name).version
    with torch.no_grad():
        assert torch.equal(reg.load_model(name, str(version))(X), model(X))
    wrapped = reg.load_pyfunc(name, str(version))
    assert wrapped.threshold == 0.5 and wrapped.segment(np.zeros((20, 20, 3), np.uint8)).mask.shape == (20, 20)


@pytest.mark.slow
def test_end_to_end_over_http(mlflow_server, monkeypatch):
    """The whole story on a real tracking server: register, gate, promote, history, rollback, load.
    The registry writes land in the server's own store and the artifacts travel through it."""
    monkeypatch.setenv("LESIONFLOW_USER", "ci-bot")
    name = "lesion-e2e"
    with tracking_uri(mlflow_server.url):
        exp_id = MlflowClient().create_experiment("e2e-train")
        logged: dict[str, Segmenter] = {}
        dices = {"1": 0.70, "2": 0.75, "3": 0.745}
        for seed, dice in enumerate(dices.values(), start=1):
            champ = reg.champion_version(name)
            decision = reg.gate(overall(dice=dice), champ and {"overall": reg.version_metrics(name, champ)})
            version, model = register(exp_id, name, seed=seed, dice=dice, **{lineage.TAG_PIPELINE_RUN_ID: f"run-{seed}"})
            logged[version] = model
            assert decision.promote  # v3 is 0.005 worse: within the default tolerance 0.01
            reg.move_alias(name, "champion", version, why=decision.reason, action="promote")
        assert [reg.version_info(name, v)["tags"][lineage.TAG_PARENT_VERSION] for v in "123"] == ["none", "1", "2"]
        assert reg.version_info(name, "3")["tags"][lineage.TAG_PIPELINE_RUN_ID] == "run-3"

        # a candidate beyond tolerance is refused and the champion stays put
        refused = reg.gate(overall(dice=0.70), {"overall": reg.version_metrics(name, reg.champion_version(name))})
        assert not refused.promote and "0.7000 < champion 0.7450" in refused.reason
        assert reg.champion_version(name) == "3"

        # every version loads by number and gives the outputs of the module that was logged
        with torch.no_grad():
            outputs = {v: m(X) for v, m in logged.items()}
            for v in logged:
                assert torch.equal(reg.load_model(name, v)(X), outputs[v])
            assert not torch.equal(outputs["1"], outputs["2"])
            assert torch.equal(reg.load_model(name, "champion")(X), outputs["3"])

            assert reg.rollback(name, why="incident 42").to_version == "2"
            assert torch.equal(reg.load_model(name, "champion")(X), outputs["2"])
            assert reg.rollback(name).to_version == "1"
            assert torch.equal(reg.load_model(name, "champion")(X), outputs["1"])
            assert reg.rollback(name, "3", why="fixed upstream").to_version == "3"
            assert torch.equal(reg.load_model(name, "champion")(X), outputs["3"])

        hist = reg.history(name)
        assert [(m.action, m.from_version, m.to_version) for m in hist] == [
            ("promote", None, "1"), ("promote", "1", "2"), ("promote", "2", "3"),
            ("rollback", "3", "2"), ("rollback", "2", "1"), ("rollback", "1", "3"),
        ]
        assert all(m.who == "ci-bot" and m.when for m in hist)
        assert hist[3].why == "incident 42" and "0.7450 >= champion 0.7500" in hist[2].why
        # the history is ordinary finished runs in the tracking server, visible in its UI
        exp = MlflowClient().get_experiment_by_name(f"{name}-alias-history")
        runs = MlflowClient().search_runs([exp.experiment_id])
        assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}

        with pytest.raises(RegistryError, match="existing versions: 1, 2, 3"):
            reg.load_model(name, "4")
        with pytest.raises(RegistryError, match="existing aliases: champion"):
            reg.load_model(name, "champoin")

        # the weights went up through the server (mlflow-artifacts:/) into its own destination
        uris = [MlflowClient().get_model_version_download_uri(name, v) for v in "123"]
        assert all(u.startswith("mlflow-artifacts:/") for u in uris), uris
        for uri in uris:  # mlflow-artifacts:/<path> lives at <destination>/<path> on the server
            stored = list((mlflow_server.artifacts / uri.removeprefix("mlflow-artifacts:/")).rglob("segmenter.pt"))
            assert len(stored) == 1 and stored[0].stat().st_size > 0, uri

    # the registry really is the server's SQLite store, not whatever a default URI pointed at
    with sqlite3.connect(mlflow_server.db) as db:
        versions = db.execute("select version, storage_location from model_versions where name = ?",
                              (name,)).fetchall()
        alias = db.execute("select version from registered_model_aliases where name = ? and "
                           "alias = 'champion'", (name,)).fetchone()
    assert sorted(v for v, _ in versions) == [1, 2, 3] and alias == (3,)
    assert sorted(loc for _, loc in versions) == sorted(uris)
