"""params.yaml validates, fails loudly naming the key, and layers/overrides predictably."""

import pytest

from lesionflow import config
from lesionflow.errors import ConfigError
from tests.conftest import REPO


def test_checked_in_params_and_configs_validate():
    params = config.load(REPO / "params.yaml")
    assert params.ingest.source == "synthetic"
    for extra in sorted((REPO / "configs").glob("*.yaml")):
        layered = config.load([REPO / "params.yaml", extra])
        assert layered.ingest.source != "synthetic", extra


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        config.validate({"train": {"epoch": 3}})
    assert "train.epoch" in str(err.value)
    assert "epochs" in str(err.value)  # the allowed keys are listed


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"ingest\.on_error.*'raise' or 'skip'"):
        config.validate({"ingest": {"on_error": "ignore"}})


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="ingest.split"):
        config.validate({"ingest": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}})


def test_overrides_are_typed_and_validated(tmp_path):
    params = config.load(REPO / "params.yaml", ["train.epochs=3", "train.lr=1e-3",
                                                "ingest.folder_fields=[lesion_type, group]"])
    assert params.train.epochs == 3 and params.train.lr == pytest.approx(1e-3)
    assert params.ingest.folder_fields == ["lesion_type", "group"]
    with pytest.raises(ConfigError, match="train.epochs"):
        config.load(REPO / "params.yaml", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="key.path=value"):
        config.load(None, ["train.epochs"])


def test_later_files_win_and_missing_file_is_named(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train: {epochs: 2}\n")
    params = config.load([REPO / "params.yaml", extra])
    assert params.train.epochs == 2
    assert params.train.batch_size == config.load(REPO / "params.yaml").train.batch_size
    with pytest.raises(ConfigError, match="nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_digest_ignores_runtime_locations_but_not_tunables():
    base = config.load(None)
    moved = config.load(None, ["runtime.workdir=/elsewhere"])
    tuned = config.load(None, ["train.epochs=99"])
    assert base.digest() == moved.digest() != tuned.digest()


def test_json_round_trip_is_what_components_receive():
    params = config.load(REPO / "params.yaml", ["seed=7"])
    assert config.from_json(params.model_dump_json()) == params
