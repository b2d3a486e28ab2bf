"""The KFP pipeline: the checked-in YAML matches the code, and the same pipeline function runs
end to end with kfp.local (real subprocess tasks, SQLite MLflow, DVC with a local remote)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

import lesionflow
from lesionflow import config, lineage, registry
from pipelines.lesionflow_pipeline import COMPILED, compile_pipeline
from tests.conftest import REPO

TINY = [
    "synthetic.n_images=24", "synthetic.n_videos=2", "synthetic.frames_per_video=4",
    "synthetic.size=64", "model.base_channels=8", "model.depth=2", "train.image_size=64",
    "train.epochs=3", "train.batch_size=8", "evaluate.n_overlays=2",
    "meta_train.enabled=true", "meta_train.outer_steps=8", "meta_train.rerank_every=4", "meta_train.support_size=4",
    "meta_train.query_size=4", "pseudo_label.hide_masks_fraction=0.3",
    "video.image_size=32", "video.base_channels=4", "video.depth=2", "video.max_steps=5",
]


def test_checked_in_yaml_matches_the_code(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml", cluster=config.load(REPO / "params.yaml").cluster)
    assert fresh.read_text() == COMPILED.read_text(), (
        "pipelines/lesionflow_pipeline.yaml is stale: run `lesionflow compile` and commit it")


def test_compiled_pipeline_wires_the_steps_on_one_image():
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "synthesize-video", "pseudo-label", "meta-train", "evaluate", "register"}
    assert tasks["synthesize-video"]["dependentTasks"] == ["ingest"]
    assert tasks["pseudo-label"]["dependentTasks"] == ["synthesize-video"]
    assert tasks["meta-train"]["dependentTasks"] == ["pseudo-label"]
    assert set(tasks["register"]["dependentTasks"]) == {"evaluate", "meta-train"}
    # lineage travels step to step: register gets what every step added, through meta_train
    lineage_in = tasks["register"]["inputs"]["parameters"]["lineage_json"]["taskOutputParameter"]
    assert lineage_in["producerTask"] == "meta-train"
    for task, upstream in (("synthesize-video", "ingest"), ("pseudo-label", "synthesize-video"),
                           ("meta-train", "pseudo-label")):
        assert tasks[task]["inputs"]["parameters"]["lineage_json"]["taskOutputParameter"]["producerTask"] == upstream
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {lesionflow.IMAGE}
    # the default cluster settings: every step gets the credentials Secret as env, nothing else
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    assert all(set(e) == {"secretAsEnv"} for e in executors.values())


def test_summary_says_what_its_figures_are_of():
    """The epochs the budget let run, above the test metrics; the graph the frames/s were served by."""
    from lesionflow.cli import format_summary

    train = config.Params().train.model_copy(update={"epochs": 150, "max_minutes": 48.0})
    table = {"overall": {"dice": 0.833, "iou": 0.754, "hd95": 50.2, "n": 143}}
    summary = {"pipeline_run_id": "r", "dataset_dvc_md5": "d.dir", "corrections_md5": "none",
               "test_metrics": table, "trained_epochs": "41", "trained_precision": "fp32",
               "fps": 36.2, "served": "int8", "model": "polyp-segmenter", "version": "1", "promoted": True, "gate": "ok",
               "compared": None, "champion": "1", "tracking_uri": "sqlite://"}
    cut = format_summary(summary, train)
    assert ("  training         41 of 150 epochs in fp32: train.max_minutes 48 ended the schedule on this "
            "machine" in cut)
    assert cut.index("training ") < cut.index("test metrics")  # read before the figures it qualifies
    assert "training " not in format_summary({**summary, "trained_epochs": lineage.NONE}, train)
    assert "41 of 150 epochs: " in format_summary({**summary, "trained_precision": lineage.NONE}, train)
    assert "  inference        36.2 frames/s served as int8 (real time: 30)" in cut


@pytest.mark.slow
def test_main_job_runs_locally_twice_then_rolls_back(tmp_path):
    """`lesionflow run` twice on synthetic data: same data → same DVC hash; the second run's
    pseudo-labels come from the first model, the second model is gated against the first;
    lineage tags point at the data, the pseudo-label data, params, labeller and parent champion;
    the CLI rollback and history work on the result."""
    workdir = tmp_path / "work"
    env = {**os.environ, "LESIONFLOW_USER": "ci-bot"}
    base = [sys.executable, "-m", "lesionflow.cli"]
    overrides = [arg for item in TINY + [f"runtime.workdir={workdir}"] for arg in ("--set", item)]

    def run(*extra: str) -> str:
        proc = subprocess.run(base + ["run", "--params", str(REPO / "params.yaml"), *overrides, *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    first = run()
    assert "no champion of lesionflow-segmenter yet" in first
    assert "lesionflow run finished" in first and "registered       lesionflow-segmenter v1" in first
    second = run("--set", "meta_train.outer_steps=4")
    assert "v2" in second

    params = config.load(REPO / "params.yaml", TINY + [f"runtime.workdir={workdir}"])
    from lesionflow import tracking
    tracking.connect(params)
    name = params.runtime.model_name
    v1, v2 = registry.version_info(name, "1"), registry.version_info(name, "2")
    assert v1["tags"][lineage.TAG_DATASET_MD5] == v2["tags"][lineage.TAG_DATASET_MD5]  # deterministic data
    assert v1["tags"][lineage.TAG_DATASET_MD5].endswith(".dir")
    assert v1["tags"][lineage.TAG_PARENT_VERSION] == "none"
    assert v2["tags"][lineage.TAG_PARENT_VERSION] == "1"
    # run 1 had no champion to label with; run 2's pseudo-labels came from v1
    assert v1["tags"][lineage.TAG_LABELLER_VERSION] == "none"
    assert v2["tags"][lineage.TAG_LABELLER_VERSION] == f"{params.runtime.model_name}@1"
    assert v1["tags"][lineage.TAG_PSEUDO_DATASET_MD5] != v2["tags"][lineage.TAG_PSEUDO_DATASET_MD5]
    assert v1["tags"][lineage.TAG_PARAMS_HASH] != v2["tags"][lineage.TAG_PARAMS_HASH]
    assert (workdir / "dvc-remote").is_dir() and any((workdir / "dvc-remote").rglob("*"))
    # lineage that rebuilds: full params, G's id, records trained on, per-record provenance
    assert registry.version_artifact(name, "2", lineage.PARAMS_ARTIFACT)["meta_train"]["outer_steps"] == 4
    assert v1["tags"][lineage.TAG_VIDEO_MODEL].startswith("runs:/")
    assert v1["tags"][lineage.TAG_GIT_DIRTY] in ("true", "false")
    trained = registry.version_artifact(name, "1", lineage.RECORDS_ARTIFACT)
    assert {row["split"] for row in trained} == {"train", "val"}
    assert {row["labelled_by"] for row in trained if row["kind"] == "still"} == {"annotator:unknown"}
    assert {row["labelled_by"] for row in trained if row["kind"] == "synthetic_video"} <= {
        v1["tags"][lineage.TAG_VIDEO_MODEL]}
    # run 2: the champion judged G's masks but did not draw them; it drew the hidden ones
    authors = {(row["kind"], row["labelled_by"])
               for row in registry.version_artifact(name, "2", lineage.RECORDS_ARTIFACT)}
    assert ("pseudo_label", f"{name}@1") in authors
    assert {who for kind, who in authors if kind == "synthetic_video"} <= {v2["tags"][lineage.TAG_VIDEO_MODEL]}
    gate_record = registry.version_artifact(name, "2", lineage.GATE_ARTIFACT)
    compared = gate_record["comparison"]
    assert compared["champion_version"] == "1" and compared["n"] > 0
    assert compared["excluded"]["seen_by_champion"] == 0  # same stable splits: nothing leaked
    assert registry.version_info(name, "2")["tags"][lineage.TAG_GATE_N] == str(compared["n"])
    assert_workbench(params, v2)

    # rebuilt from its lineage alone: the same weights, so exactly the same metrics
    rebuilt = subprocess.run(base + ["reproduce", "1", "--params", str(REPO / "params.yaml"), *overrides],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert "reproduced: largest difference 0.000000" in rebuilt.stdout

    champion = registry.champion_version(name)
    moves = registry.history(name)
    assert moves[0].to_version == "1" and moves[0].who == "ci-bot"
    if champion == "2":
        rolled = subprocess.run(base + ["rollback", "--params", str(REPO / "params.yaml"), *overrides,
                                        "--why", "test"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert rolled.returncode == 0, rolled.stderr
        assert registry.champion_version(name) == "1"
    hist = subprocess.run(base + ["history", "--params", str(REPO / "params.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert hist.returncode == 0 and "promote" in hist.stdout and "ci-bot" in hist.stdout


def assert_workbench(params: config.Params, version: dict) -> None:
    """What a reviewer sees in the MLflow UI for the pipeline run behind ``version``: a parent run
    named and described for comparison, with key params and per-type metrics; one tag per
    dataset role and the datasets as run inputs carrying their DVC hashes; labelled overlays,
    worst first; the version's description with its gate record and alias-history link."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = version["tags"]
    experiment = client.get_experiment_by_name(params.runtime.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string=(
        f"tags.`{lineage.TAG_PIPELINE_RUN_ID}` = '{tags[lineage.TAG_PIPELINE_RUN_ID]}'"))
    by_step = {r.data.tags[lineage.TAG_STEP]: r for r in runs}
    parent = by_step["pipeline"]
    dice = parent.data.metrics["test_dice"]
    assert parent.info.run_name == f"synthetic · Dice {dice:.3f} · {tags[lineage.TAG_GATE]} v{version['version']}"
    assert "Champion now" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["model.arch"] == params.model.arch
    assert any(k.startswith("test_") and k.endswith("_dice") and k != "test_dice" for k in parent.data.metrics)
    # each dataset role has its own tag, and the three hashes differ
    produced = {role: by_step[step].data.tags[tag] for role, tag, step in (
        ("ingested", lineage.TAG_DATASET_MD5, "ingest"), ("augmented", lineage.TAG_AUGMENTED_DATASET_MD5,
                                                          "synthesize_video"),
        ("trained_on", lineage.TAG_PSEUDO_DATASET_MD5, "pseudo_label"))}
    assert len(set(produced.values())) == 3 and produced["ingested"] == tags[lineage.TAG_DATASET_MD5]
    def inputs(run) -> set[tuple[str, str]]:
        return {(d.dataset.digest, t.value) for d in run.inputs.dataset_inputs for t in d.tags
                if t.key == "mlflow.data.context"}

    assert inputs(by_step["meta_train"]) == {(tags[lineage.TAG_PSEUDO_DATASET_MD5], "training")}
    assert inputs(parent) == {(md5, role) for role, md5 in produced.items()}
    assert by_step["meta_train"].info.run_name == ("meta_train" if params.meta_train.enabled else "train")
    overlays = sorted(a.path for a in client.list_artifacts(by_step["evaluate"].info.run_id, "overlays"))
    assert overlays and overlays[0].startswith("overlays/001_dice")
    dices = [float(p.split("_dice")[1].split("_")[0]) for p in overlays]
    assert dices == sorted(dices)  # worst first
    description = client.get_model_version(params.runtime.model_name, version["version"]).description
    assert f"**Gate: {tags[lineage.TAG_GATE]}**" in description and "#/experiments/" in description
