"""The fair gate: candidate and champion compared only on test records neither has seen, the
comparison recorded, refusals in the alias history (real SQLite MLflow store, real datasets on
disk; the whole pipeline with a worse candidate is in test_e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from lesionflow import config, lineage, registry, tracking
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import GateError
from lesionflow.models import runtime
from lesionflow.models.store import load_model, save_model
from lesionflow.steps import evaluate as evaluate_step
from lesionflow.steps import register as register_step
from lesionflow.steps.evaluate import (
    compare_with_champion,
    record_set_hash,
    score_model,
    select,
    unseen,
)
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.meta_train import write_training_records
from lesionflow.steps.train import new_segmenter
from tests.test_pseudo_label import SMALL

LINEAGE = {lineage.TAG_DATASET_MD5: "x.dir", lineage.TAG_PARAMS_HASH: "p", lineage.TAG_PIPELINE_RUN_ID: "r"}


@pytest.fixture
def project(tmp_path):
    params = config.load(None, SMALL + [f"runtime.workdir={tmp_path / 'work'}", "synthetic.n_images=40"])
    dataset = tmp_path / "dataset"
    build_dataset(params, dataset)
    tracking.connect(params)
    yield params, dataset
    mlflow.end_run()


def register(params, model, seen: list) -> str:
    with mlflow.start_run():
        return registry.register_model(model, name=params.runtime.model_name, metrics={}, lineage=LINEAGE,
                                       artifacts={lineage.RECORDS_ARTIFACT: seen})


def rows(records) -> list[dict]:
    return [{"id": r.id, "image_sha256": r.image_sha256} for r in records]


def test_unseen_matches_ids_and_image_content():
    from lesionflow.data.manifest import Record

    def record(i: str, sha: str) -> Record:
        return Record(id=i, kind="still", image=f"images/{i}.png", mask=f"masks/{i}.png", image_sha256=sha,
                      mask_sha256="m", height=8, width=8, channels=3, lesion_type="t", group=i,
                      split="test", source=i)

    records = [record("a", "1"), record("b", "2"), record("c", "3")]
    # "b" by id; "c" as a renamed copy of the same image
    assert [r.id for r in unseen(records, [{"id": "b", "image_sha256": "9"},
                                           {"id": "z", "image_sha256": "3"}])] == ["a"]
    assert record_set_hash(records) == record_set_hash(records[::-1]) != record_set_hash(records[:2])


def test_comparison_leaves_out_what_the_champion_trained_on(project, tmp_path):
    """A champion that trained on some of today's test records (old splits, or another dataset
    version) is scored only on the rest, and so is the candidate; the counts say so."""
    params, dataset = project
    records = read_manifest(dataset)
    test = select(records, "test")
    assert len(test) >= 4
    champion_seen = select(records, "train") + test[:2]
    register(params, new_segmenter(params, dataset), rows(champion_seen))
    registry.move_alias(params.runtime.model_name, "champion", "1", why="test", action="set")

    model_dir = tmp_path / "candidate"
    candidate = new_segmenter(params, dataset)
    save_model(candidate, model_dir)
    write_training_records(model_dir, select(records, "train") + select(records, "val"))
    scored = score_model(candidate, dataset, test, params.evaluate.threshold)
    comparison = compare_with_champion(params, dataset, test, model_dir, scored)
    assert comparison.champion_version == "1" and comparison.champion_records_known
    assert comparison.n == len(test) - 2
    assert comparison.excluded == {"seen_by_champion": 2, "seen_by_candidate": 0}
    assert comparison.record_set == record_set_hash(test[2:])
    assert comparison.candidate["overall"]["n"] == comparison.champion["overall"]["n"] == comparison.n
    assert json.dumps(comparison.candidate)  # stored as JSON in the gate record

    # a champion that saw every test record leaves nothing fair to compare on: a named error
    register(params, new_segmenter(params, dataset), rows(records))
    registry.move_alias(params.runtime.model_name, "champion", "2", why="test", action="set")
    with pytest.raises(GateError, match="nothing fair to compare on"):
        compare_with_champion(params, dataset, test, model_dir, scored)


def test_refusals_are_in_the_history_and_never_rolled_back_to(project):
    params, dataset = project
    name = params.runtime.model_name
    v1 = register(params, new_segmenter(params, dataset), [])
    v2 = register(params, new_segmenter(params, dataset), [])
    registry.move_alias(name, "champion", v1, why="first", action="promote", gate_record={"decision": "promoted"})
    refusal = registry.record_refusal(name, v2, why="malignant: candidate dice=0.6 < 0.8",
                                      gate_record={"decision": "refused", "n": 12})
    assert (refusal.action, refusal.candidate, refusal.to_version) == ("refuse", v2, v1)
    assert registry.champion_version(name) == v1
    moves = registry.history(name)
    assert [(m.action, m.candidate) for m in moves] == [("promote", None), ("refuse", v2)]
    with pytest.raises(Exception, match="no earlier champion"):
        registry.previous_champion(name)  # the refused version was never champion
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(f"{name}-alias-history")
    runs = client.search_runs([exp.experiment_id], "tags.action = 'refuse'")
    stored = json.loads(mlflow.artifacts.load_text(f"runs:/{runs[0].info.run_id}/gate.json"))
    assert stored == {"decision": "refused", "n": 12}


@pytest.mark.parametrize("int8", [True, False])
def test_the_export_evaluate_scored_is_the_one_registered(project, tmp_path, int8):
    """Evaluate makes the export (int8 only after the validation check, with its figures) and
    scores through it; register stores those very bytes and tags the precision it serves in."""
    params, dataset = project
    params = params.with_section("evaluate", int8=int8)
    model_dir, out_dir = tmp_path / "candidate", tmp_path / "report"
    save_model(new_segmenter(params, dataset), model_dir)
    write_training_records(model_dir, select(read_manifest(dataset), "train"))
    with mlflow.start_run():
        evaluation = evaluate_step.evaluate(params, dataset, model_dir, out_dir)
    (graph,) = evaluation.export
    if int8:
        n_val = len(select(read_manifest(dataset), "val"))
        assert graph["n_val"] == n_val > 0 and graph["n_calibration"] > 0
        drop = graph["val_dice_float32"] - graph["val_dice_int8"]
        assert graph["precision"] == ("int8" if drop <= params.evaluate.int8_max_dice_drop else "float32")
        assert f"{graph['val_dice_int8']:.4f}" in graph["reason"]
    else:
        assert (graph["precision"], graph["reason"]) == ("float32", "evaluate.int8 is off")
        assert (out_dir / runtime.ONNX / runtime.SINGLE).read_bytes() == runtime.to_onnx(load_model(model_dir))
    assert evaluate_step.Evaluation.load(out_dir / evaluate_step.REPORT_FILE).export == evaluation.export

    with mlflow.start_run():
        outcome = register_step.register(params, model_dir, evaluation, LINEAGE, "run-1",
                                         onnx_dir=out_dir / runtime.ONNX)
    name = params.runtime.model_name
    assert registry.version_info(name, outcome.version)["tags"][lineage.TAG_SERVED_PRECISION] == graph["precision"]
    served = registry.load_pyfunc(name, outcome.version).predictor
    assert isinstance(served, runtime.OnnxSegmenter)
    stored = mlflow.artifacts.download_artifacts(f"models:/{name}/{outcome.version}", dst_path=str(tmp_path / "v"))
    exported = next(Path(stored).rglob(runtime.SINGLE)).read_bytes()
    assert exported == (out_dir / runtime.ONNX / runtime.SINGLE).read_bytes()
