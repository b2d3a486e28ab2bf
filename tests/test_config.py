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


def test_params_yaml_is_generated_from_the_models():
    """One source of defaults: the checked-in params.yaml is exactly what the models generate."""
    assert (REPO / "params.yaml").read_text() == config.defaults_yaml(), (
        "params.yaml differs from the defaults in lesionflow/config.py: change defaults there, then "
        "run `lesionflow params --write params.yaml` and commit both")
    assert config.load(REPO / "params.yaml") == config.load(None) == config.Params()


def test_every_key_has_a_description():
    missing = []

    def walk(section, prefix):
        for name, field in type(section).model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            if isinstance(getattr(section, name), config.BaseModel):
                walk(getattr(section, name), f"{prefix}{name}.")

    walk(config.Params(), "")
    assert not missing, f"give these a Field(description=...): {missing}"


def test_cli_prints_and_writes_the_defaults(tmp_path, capsys):
    from lesionflow.cli import main

    assert main(["params"]) == 0
    assert capsys.readouterr().out == config.defaults_yaml()
    assert main(["params", "--write", str(tmp_path / "p.yaml")]) == 0
    assert config.load(tmp_path / "p.yaml") == config.Params()


@pytest.mark.parametrize("overrides, keys, fix", [
    (["train.image_size=100"], ["train.image_size", "model.depth"], "set train.image_size to 96 or 112"),
    (["model.depth=5", "train.image_size=32"], ["train.image_size"], "set train.image_size to 64"),
    (["video.image_size=60"], ["video.image_size", "video.depth"], "56 or 64"),
    (["serve.min_side=5000"], ["serve.min_side", "serve.max_side"], "raise max_side"),
    (["weak_label.n_superpixels=5000", "train.image_size=64", "model.depth=2"],
     ["weak_label.n_superpixels", "train.image_size"], "lower n_superpixels"),
    (["meta_train.enabled=true", "meta_train.per_lesion_type=true", "meta_train.query_from=other_task"],
     ["meta_train.query_from", "per_lesion_type"], "query_from: same_task"),
    (["meta_train.per_lesion_type=true"], ["meta_train.per_lesion_type", "meta_train.enabled"],
     "set meta_train.enabled: true"),
    (["ingest.split.train=0.9"], ["ingest.split"], "adjust ingest.split"),
    (["pseudo_label.quantile=0.5"], ["pseudo_label.threshold", "pseudo_label.quantile"], "exactly one"),
    (["model.in_channels=2"], ["model.in_channels"], "1 or 3"),
    (["runtime.mlflow_tracking_uri=ftp://x"], ["runtime.mlflow_tracking_uri"], "http(s)://"),
    (["runtime.dvc_remote=gs://b/p"], ["runtime.dvc_remote"], "s3://bucket/prefix"),
])
def test_cross_field_mistakes_fail_at_validation_naming_keys_and_fix(overrides, keys, fix):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert all(key in str(err.value) for key in keys) and fix in str(err.value), str(err.value)
    assert "Value error" not in str(err.value)


def test_cross_field_problems_are_listed_together():
    """(They are checked once every key is valid on its own, so they follow a typo's fix.)"""
    with pytest.raises(ConfigError) as err:
        config.load(None, ["train.image_size=100", "serve.min_side=5000"])
    assert "train.image_size" in str(err.value) and "serve.min_side" in str(err.value)


def test_version_numbers_may_be_given_as_numbers():
    params = config.load(None, ["train.init_from=3", "serve.model=2", "pseudo_label.model=1",
                                "cluster.train.cpu=4"])
    assert (params.train.init_from, params.serve.model, params.pseudo_label.model,
            params.cluster.train.cpu) == ("3", "2", "1", "4")


@pytest.mark.parametrize("content, says", [
    (b"train: [\n", "not valid YAML"),
    (b"- a\n- b\n", "mapping at the top level"),
    (b"train:\n  epochs: 3\ntrain:\n  lr: 1\n", "'train' appears twice"),
    (b"train:\n  epochs: \xff\n", "not UTF-8"),
])
def test_malformed_params_files_are_named(tmp_path, content, says):
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as err:
        config.load(path)
    assert str(path) in str(err.value) and "<unicode string>" not in str(err.value)


def test_an_empty_params_file_means_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert config.load(tmp_path / "empty.yaml") == config.Params()


def test_an_override_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match=r"train.epochs=\[3.*not valid YAML"):
        config.load(None, ["train.epochs=[3"])
