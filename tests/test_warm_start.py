"""Warm start (``train.init_from``): training starts from a registered version's weights and input
conventions, refuses weights that do not fit, and falls back to scratch before the first champion
(real SQLite MLflow registry)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from lesionflow import config, lineage, registry, tracking
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import Record, staged_dataset, write_png
from lesionflow.errors import RegistryError, WarmStartError
from lesionflow.models.router import LesionTypeRouter
from lesionflow.models.segmenter import Segmenter
from lesionflow.models.store import load_model
from lesionflow.models.unet import UNet
from lesionflow.steps.train import init_version, new_segmenter, train

REPO = Path(__file__).resolve().parents[1]
NAME = "warm-model"
# the registered models' input conventions: deliberately unlike the dataset's fingerprint
SIZE, MEAN, STD = 32, [10.0, 20.0, 30.0], [2.0, 3.0, 4.0]


def load_params(tmp_path: Path, *overrides: str) -> config.Params:
    return config.load(REPO / "params.yaml", [
        f"runtime.workdir={tmp_path / 'work'}", f"runtime.model_name={NAME}", "model.base_channels=4",
        "model.depth=2", "train.image_size=48", "train.batch_size=4", "train.device=cpu", *overrides])


@pytest.fixture
def params(tmp_path):
    p = load_params(tmp_path)
    tracking.connect(p)
    yield p
    mlflow.set_tracking_uri(None)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """12 RGB stills 40x40 with a bright square lesion: 8 train, 2 val, 2 test."""
    rng = np.random.default_rng(0)
    root = tmp_path / "dataset"
    with staged_dataset(root) as stage:
        records = []
        for i in range(12):
            image = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
            mask = np.zeros((40, 40), np.uint8)
            y, x = rng.integers(2, 24, 2)
            image[y:y + 14, x:x + 14] += 120
            mask[y:y + 14, x:x + 14] = 255
            name = f"s{i:02d}"
            records.append(Record(
                id=name, kind="still", image=f"images/{name}.png", mask=f"masks/{name}.png",
                image_sha256=write_png(image, stage / "images" / f"{name}.png"),
                mask_sha256=write_png(mask, stage / "masks" / f"{name}.png"),
                height=40, width=40, channels=3, lesion_type="polyp", group=name,
                split="train" if i < 8 else "val" if i < 10 else "test", source=name))
        write_index(stage, records)
    return root


def segmenter(seed: int) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(UNet(3, 4, 2), SIZE, MEAN, STD)


def register(model: Segmenter | LesionTypeRouter, champion: bool = True) -> str:
    with mlflow.start_run():
        version = registry.register_model(model, name=NAME, metrics={}, lineage={
            lineage.TAG_DATASET_MD5: "0" * 32 + ".dir", lineage.TAG_PARAMS_HASH: "p",
            lineage.TAG_PIPELINE_RUN_ID: "r"})
    if champion:
        registry.move_alias(NAME, registry.CHAMPION, version, why="test", action="set")
    return version


def with_init(params: config.Params, ref: str | None, **train: object) -> config.Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"init_from": ref, **train})})


def parameters(model: Segmenter) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_warm_start_copies_the_versions_weights_and_input_conventions(params, dataset, capsys):
    registered = segmenter(seed=1)
    register(segmenter(seed=2))
    v2 = register(registered)
    for ref in ("champion", v2):
        warm = with_init(params, ref)
        assert init_version(warm) == v2
        model = new_segmenter(warm, dataset)
        expected = registered.state_dict()
        assert model.state_dict().keys() == expected.keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), key
        # the version's image size and normalisation, not train.image_size (48) or the fingerprint
        assert model.image_size == SIZE
        assert model.mean.flatten().tolist() == MEAN and model.std.flatten().tolist() == STD
    assert f"training at its image size {SIZE}, not train.image_size 48" in capsys.readouterr().out
    # dropout has no weights: a warm start may change it
    assert new_segmenter(with_init(params, "champion").model_copy(update={
        "model": params.model.model_copy(update={"dropout": 0.2})}), dataset).net.hparams["dropout"] == 0.2


def test_another_architecture_is_refused_naming_the_key(params, dataset):
    version = register(segmenter(seed=1))
    wider = with_init(params, "champion").model_copy(update={
        "model": params.model.model_copy(update={"base_channels": 8})})
    with pytest.raises(WarmStartError, match=rf"model\.base_channels is 8 here but 4 in v{version}.*"
                                             r"train\.init_from: null"):
        new_segmenter(wider, dataset)


def test_per_lesion_type_versions_start_each_types_model_from_its_own_weights(params, dataset):
    only = segmenter(seed=3)
    register(LesionTypeRouter({"polyp": only}))
    model = new_segmenter(with_init(params, "champion"), dataset)
    assert torch.equal(parameters(model), parameters(only))
    flat = segmenter(seed=5)
    two = register(LesionTypeRouter({"polyp": segmenter(seed=4), "flat": flat}))
    with pytest.raises(WarmStartError, match=rf"v{two} is one model per lesion type \(flat, polyp\)"):
        new_segmenter(with_init(params, "champion"), dataset)
    # per-type training names the type: each model starts from its own type's weights ...
    assert torch.equal(parameters(new_segmenter(with_init(params, "champion"), dataset, "flat")),
                       parameters(flat))
    # ... and a type the champion never had starts from scratch, not from another type
    fresh = new_segmenter(with_init(params, "champion"), dataset, "sessile")
    assert not torch.equal(parameters(fresh), parameters(flat))


def test_no_champion_yet_trains_from_scratch(params, dataset, capsys):
    warm = with_init(params, "champion")
    for step in ("no model", "a version without the alias"):
        assert init_version(warm) is None, step
        model = new_segmenter(warm, dataset)
        assert "has no champion yet: training from scratch" in capsys.readouterr().out
        assert model.image_size == 48 and model.mean.flatten().tolist() != MEAN
        register(segmenter(seed=1), champion=False)


def test_a_missing_version_is_the_registrys_named_error(params, dataset):
    register(segmenter(seed=1))
    with pytest.raises(RegistryError, match="has no version '7'; existing versions: 1"):
        new_segmenter(with_init(params, "7"), dataset)


def test_training_from_the_champion_moves_on_from_its_weights(params, dataset, tmp_path):
    champion = segmenter(seed=1)
    register(champion)
    start = parameters(champion)
    trained = {}
    for ref in ("champion", None):
        with mlflow.start_run():
            train(with_init(params, ref, epochs=1, lr=1e-3, augment=False), dataset, tmp_path / str(ref))
        trained[ref] = parameters(load_model(tmp_path / str(ref)))
    moved = torch.linalg.vector_norm(trained["champion"] - start)
    assert moved > 0
    # one small-lr epoch stays near the champion; the scratch run is a whole random init away
    assert moved < 0.2 * torch.linalg.vector_norm(trained[None] - start)
