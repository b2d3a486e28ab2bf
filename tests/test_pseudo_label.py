"""Pseudo-labels: TTA agreement, scorer fallbacks, the good/bad cut, and the step on a real
(small, synthetic) canonical dataset with a champion registered in a SQLite MLflow store."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch

from lesionflow import config, lineage, registry, tracking
from lesionflow.data.manifest import TRUSTED_KINDS, read_manifest, write_manifest
from lesionflow.models.router import LesionTypeRouter, UnknownLesionTypeError
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model, save_model
from lesionflow.models.unet import UNet
from lesionflow.pseudo import Prediction, predict_with_tta, quality_cutoff, score
from lesionflow.steps import meta_train as meta_train_step
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.pseudo_label import hidden_ids, pseudo_label
from lesionflow.steps.train import new_segmenter

SMALL = ["synthetic.n_images=16", "synthetic.n_videos=1", "synthetic.frames_per_video=4",
         "synthetic.n_weak=0", "synthetic.size=32", "model.base_channels=4", "model.depth=1",
         "train.image_size=32", "meta_train.enabled=true", "meta_train.outer_steps=4", "meta_train.rerank_every=2",
         "meta_train.support_size=2", "meta_train.query_size=2"]


class Brightness:
    """Lesion = bright pixels: equivariant under flips and turns."""

    def predict_proba(self, images, lesion_types=None):
        return [(im.mean(axis=2) if im.ndim == 3 else im).astype(np.float32) / 255 for im in images]


class LeftHalf:
    """Always the left half of the frame: maximally inconsistent under flips."""

    def predict_proba(self, images, lesion_types=None):
        out = []
        for im in images:
            p = np.zeros(im.shape[:2], np.float32)
            p[:, : im.shape[1] // 2] = 1
            out.append(p)
        return out


def test_tta_agreement_separates_consistent_from_inconsistent_models():
    image = np.zeros((16, 16, 3), np.uint8)
    image[3:9, 4:12] = 255
    consistent = predict_with_tta(Brightness(), image)
    assert consistent.tta_agreement == pytest.approx(1.0)
    assert consistent.mask.sum() == 6 * 8
    assert predict_with_tta(LeftHalf(), image).tta_agreement < 0.7


def test_dice_scorer_falls_back_to_tta_without_truth_and_says_so():
    pred = Prediction(mask=np.eye(4, dtype=bool), tta_agreement=0.4)
    assert score("dice", pred, np.eye(4, dtype=bool)) == (1.0, "dice")
    assert score("dice", pred, None) == (0.4, "tta")
    assert score("tta", pred, np.zeros((4, 4), bool)) == (0.4, "tta")


def test_quality_cutoff_threshold_or_quantile():
    assert quality_cutoff([0.1, 0.9], threshold=0.5, quantile=None) == 0.5
    assert quality_cutoff([0.0, 0.25, 0.5, 0.75, 1.0], threshold=None, quantile=0.5) == 0.5
    with pytest.raises(config.ConfigError, match="exactly one"):
        config.validate({"pseudo_label": {"threshold": None, "quantile": None}})


def constant_segmenter(logit: float) -> Segmenter:
    """A real Segmenter whose answer is known: zero weights, head bias ±10 → all / no lesion."""
    model = Segmenter(UNet(3, 4, 1), 16, [0.0] * 3, [1.0] * 3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net.head.bias.fill_(logit)
    return model


def test_router_routes_by_type_and_names_unknown_types():
    router = LesionTypeRouter({"everywhere": constant_segmenter(10.0), "nowhere": constant_segmenter(-10.0)})
    images = [np.zeros((20, 24, 3), np.uint8)] * 3
    out = router.predict_proba(images, ["nowhere", "everywhere", "nowhere"])
    assert [p.shape for p in out] == [(20, 24)] * 3
    assert out[0].max() < 0.01 and out[1].min() > 0.99 and out[2].max() < 0.01
    with pytest.raises(UnknownLesionTypeError, match="'thyroid'.*knows \\['everywhere', 'nowhere'\\]"):
        router.predict_proba(images[:1], ["thyroid"])
    with pytest.raises(UnknownLesionTypeError, match="one lesion type per image"):
        router.predict_proba(images[:1])


@pytest.fixture
def small_project(tmp_path):
    params = config.load(None, SMALL + [f"runtime.workdir={tmp_path / 'work'}",
                                        "pseudo_label.hide_masks_fraction=0.5"])
    dataset = tmp_path / "dataset"
    build_dataset(params, dataset)
    tracking.connect(params)
    yield params, dataset
    mlflow.end_run()


def test_without_champion_labelled_data_passes_through_as_good(small_project, tmp_path, capsys):
    params, dataset = small_project
    with mlflow.start_run():
        report = pseudo_label(params, dataset, tmp_path / "labelled")
    assert report.labeller is None and "no champion" in capsys.readouterr().out
    records = {r.id: r for r in read_manifest(tmp_path / "labelled")}
    hidden = hidden_ids(read_manifest(dataset), 0.5, params.seed)
    assert hidden and all(records[i].mask is None and records[i].kind == "unlabelled" for i in hidden)
    assert all(r.quality == "good" for r in records.values() if r.split == "train" and r.mask)
    assert not any((tmp_path / "labelled" / "masks" / f"{i}.png").exists() for i in hidden)


def test_with_champion_model_made_masks_are_scored_and_split(small_project, tmp_path):
    params, dataset = small_project
    name = params.runtime.model_name
    with mlflow.start_run():
        version = registry.register_model(new_segmenter(params, dataset), name=name, metrics={},
                                          lineage={lineage.TAG_DATASET_MD5: "x.dir",
                                                   lineage.TAG_PARAMS_HASH: "p",
                                                   lineage.TAG_PIPELINE_RUN_ID: "r"})
    registry.move_alias(name, "champion", version, why="test", action="set")
    before = (dataset / "manifest.jsonl").read_bytes()
    with mlflow.start_run():
        report = pseudo_label(params, dataset, tmp_path / "labelled")
    assert report.labeller == f"{name}@{version}" and report.cutoff == 0.8
    out = read_manifest(tmp_path / "labelled")
    train = [r for r in out if r.split == "train" and r.mask is not None]
    truth = [r for r in train if r.kind in TRUSTED_KINDS]
    made = [r for r in train if r.kind not in TRUSTED_KINDS]
    assert truth and made
    # people's masks are never judged by a model: always good, never scored
    assert all(r.quality == "good" and r.score is None for r in truth)
    assert all(r.score is not None and (r.quality == "good") == (r.score >= 0.8) for r in made)
    pseudo = [r for r in train if r.kind == "pseudo_label"]
    assert len(pseudo) == report.counts["pseudo_labelled"] == report.counts["hidden"] > 0
    assert all((tmp_path / "labelled" / r.mask).is_file() and r.labelled_by for r in pseudo)
    assert all(r.score is None for r in out if r.split != "train")  # evaluation data untouched
    assert (dataset / "manifest.jsonl").read_bytes() == before


def test_meta_train_step_per_lesion_type_saves_a_router(small_project, tmp_path):
    params, dataset = small_project
    params = params.model_copy(update={"meta_train": params.meta_train.model_copy(
        update={"per_lesion_type": True})})
    with mlflow.start_run():
        outcome = meta_train_step.run(params, dataset, tmp_path / "model")
    assert set(outcome.results) == {"elongated", "round"}
    model = load_model(tmp_path / "model")
    assert isinstance(model, LesionTypeRouter) and model.lesion_types == ["elongated", "round"]
    image = np.zeros((32, 32, 3), np.uint8)
    assert model.predict_proba([image], ["round"])[0].shape == (32, 32)
    with pytest.raises(UnknownLesionTypeError):
        model.predict_proba([image], ["polyp"])
    save_model(model, tmp_path / "again")
    assert load_model(tmp_path / "again").lesion_types == model.lesion_types


def test_per_type_champion_leaves_unknown_types_unlabelled(small_project, tmp_path):
    params, dataset = small_project
    name = params.runtime.model_name
    with mlflow.start_run():
        version = registry.register_model(
            LesionTypeRouter({"round": new_segmenter(params, dataset)}), name=name, metrics={},
            lineage={lineage.TAG_DATASET_MD5: "x.dir", lineage.TAG_PARAMS_HASH: "p",
                     lineage.TAG_PIPELINE_RUN_ID: "r"})
    registry.move_alias(name, "champion", version, why="test", action="set")
    with mlflow.start_run():
        report = pseudo_label(params, dataset, tmp_path / "labelled")
    assert "no model for ['elongated']" in report.message
    out = [r for r in read_manifest(tmp_path / "labelled") if r.split == "train"]
    assert all(r.kind != "pseudo_label" and r.score is None for r in out if r.lesion_type == "elongated")
    assert any(r.kind == "pseudo_label" for r in out if r.lesion_type == "round")


def test_trusted_labels_stay_good_under_a_champion_that_disagrees(small_project, tmp_path):
    """A champion that predicts nothing gets Dice 0 against every true mask: with the ``dice``
    scorer the old step put all ground truth in the bad pool. People's masks are never judged."""
    params, dataset = small_project
    params = params.model_copy(update={"pseudo_label": params.pseudo_label.model_copy(
        update={"scorer": "dice"})})
    name = params.runtime.model_name
    with mlflow.start_run():
        version = registry.register_model(constant_segmenter(-10.0), name=name, metrics={},
                                          lineage={lineage.TAG_DATASET_MD5: "x.dir",
                                                   lineage.TAG_PARAMS_HASH: "p",
                                                   lineage.TAG_PIPELINE_RUN_ID: "r"})
    registry.move_alias(name, "champion", version, why="test", action="set")
    with mlflow.start_run():
        pseudo_label(params, dataset, tmp_path / "labelled")
    train = [r for r in read_manifest(tmp_path / "labelled") if r.split == "train" and r.mask]
    assert {r.quality for r in train if r.kind in TRUSTED_KINDS} == {"good"}
    # the empty pseudo-labels it drew are judged (TTA: a constant model agrees with itself)
    assert all(r.score is not None for r in train if r.kind == "pseudo_label")


def test_bad_pool_holds_only_model_made_masks_and_small_tasks_are_trained(small_project, tmp_path):
    """A ground-truth record marked bad (by an older step) stays in the good pool; a lone
    correction of a lesion type no other record has is merged into a task, not dropped."""
    params, dataset = small_project
    records = read_manifest(dataset)
    train = [r for r in records if r.split == "train" and r.mask]
    truth, lone = train[0], train[1]
    edited = {truth.id: truth.model_copy(update={"quality": "bad"}),
              lone.id: lone.model_copy(update={"kind": "correction", "lesion_type": "new-type"})}
    write_manifest(dataset, [edited.get(r.id, r) for r in records])
    model = new_segmenter(params, dataset)
    picked = [edited.get(r.id, r) for r in train]
    tasks, pools = meta_train_step.build_tasks(params, dataset, picked, model)
    assert sum(p["good"] + p["bad"] for p in pools.values()) == len(picked)
    assert sum(p["bad"] for p in pools.values()) == 0
    lone_index = picked.index(edited[lone.id])
    assert any(lone_index in (*t.primary.good, *t.secondary.good) for t in tasks)
    # alone, the correction is its own support and query: it still trains
    solo, _ = meta_train_step.build_tasks(params, dataset, [edited[lone.id]], model)
    assert [t.name for t in solo] == ["new-type"] and list(solo[0].primary.good) == [0]


@pytest.mark.parametrize("bad_pseudo_labels", ["drop", "keep"])
def test_plain_training_drops_bad_pseudo_labels_unless_told_to_keep_them(small_project, tmp_path, bad_pseudo_labels):
    """Plain training on labelled + good pseudo-labels won on validation (README, meta-busi):
    by default the bad ones are not trained on, and the model's records say exactly what it saw."""
    params, dataset = small_project
    copy = tmp_path / "judged"
    shutil.copytree(dataset, copy)
    records = read_manifest(copy)
    train_ids = sorted(r.id for r in records if r.split == "train" and r.mask is not None)
    bad, good = set(train_ids[:3]), set(train_ids[3:5])
    write_manifest(copy, [r.model_copy(update={"kind": "pseudo_label", "labelled_by": "m@1",
                                               "quality": "bad" if r.id in bad else "good"})
                          if r.id in bad | good else r for r in records])
    plain = params.with_section("meta_train", enabled=False).with_section(
        "train", epochs=1, bad_pseudo_labels=bad_pseudo_labels)
    with mlflow.start_run():
        meta_train_step.run(plain, copy, tmp_path / "model")
    seen = {row["id"] for row in json.loads((tmp_path / "model" / lineage.RECORDS_FILE).read_text())}
    assert good <= seen
    assert (bad <= seen) == (bad_pseudo_labels == "keep") and (bad & seen == set()) == (bad_pseudo_labels == "drop")
