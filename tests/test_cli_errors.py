"""Every mistake a user can make ends in a named ``LesionflowError`` that says what to do: exit code
2, one ``lesionflow: <Error>: <message>`` line, never a traceback. Run as a hostile user would —
in-process through ``lesionflow.cli.main`` (fast) and, for a few, as the installed command — from
a folder that is not the repository, so the built-in defaults apply."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from lesionflow import config, errors, lineage, registry, tracking
from lesionflow.cli import main
from lesionflow.data import synthetic
from lesionflow.errors import (
    ConfigError,
    CorrectionError,
    DatasetError,
    EmptySourceError,
    EmptySplitError,
    ExportError,
    IngestError,
    LesionflowError,
    MetadataError,
    RegistryError,
    ServiceUnavailableError,
    UnreadableImageError,
)
from tests.conftest import REPO, free_port

LESIONFLOW = str(Path(sys.executable).parent / "lesionflow")  # the installed command


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse, or a library that exits: both are failures here
        rc = exit_.code
    return rc, capsys.readouterr().err


def assert_named(rc: int, err: str, expected: type[LesionflowError], *says: str) -> None:
    """Exit 2 with ``expected`` (or a subclass) named, the message saying ``says``, no traceback."""
    assert "Traceback" not in err and "internal error" not in err, err
    found = re.search(r"^lesionflow: (\w+): ", err, re.M)
    assert rc == 2 and found, err
    raised = getattr(errors, found.group(1), None)
    assert isinstance(raised, type) and issubclass(raised, expected), err
    assert all(s in err for s in says), err


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """An empty folder that is not the repository, as the current folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small valid source folder (images/, masks/, metadata.csv) that the cases break copies of."""
    cfg = config.SyntheticConfig(n_images=8, n_videos=0, n_weak=0, size=32)
    return synthetic.make_synthetic_source(cfg, tmp_path_factory.mktemp("source") / "src")


META = ["--set", "ingest.metadata_csv=metadata.csv", "--set", "ingest.columns.lesion_type=lesion_type",
        "--set", "ingest.columns.group=group"]


# --- params: files and --set ------------------------------------------------------------------

PARAMS_FILES = {
    "typo": (b"train:\n  epoch: 3\n", "train.epoch: unknown key (allowed here:"),
    "wrong type": (b"train:\n  epochs: three\n", "train.epochs: Input should be a valid integer"),
    "malformed": (b"train: [\n", "is not valid YAML"),
    "a list": (b"- train\n- ingest\n", "must hold a mapping at the top level"),
    "duplicate key": (b"train: {epochs: 3}\ntrain: {lr: 1}\n", "'train' appears twice"),
    "not utf-8": (b"ingest:\n  source: caf\xe9\n", "save it as UTF-8"),
    "image size vs depth": (b"train: {image_size: 100}\n", "set train.image_size to 96 or 112"),
}


@pytest.mark.parametrize("case", sorted(PARAMS_FILES))
def test_a_bad_params_file_is_named(case, outside, capsys):
    content, says = PARAMS_FILES[case]
    (outside / "mine.yaml").write_bytes(content)
    rc, err = run_cli(["ingest", "--out", "ds", "--params", "mine.yaml"], capsys)
    assert_named(rc, err, ConfigError, says)
    assert not (outside / "ds").exists()


OVERRIDES = {
    "typo": (["train.epoch=3"], "unknown key (allowed here: augment"),
    "wrong type": (["train.epochs=three"], "train.epochs: Input should be a valid integer"),
    "no value": (["train.epochs"], "must look like key.path=value"),
    "value not yaml": (["train.epochs=[3"], "not valid YAML"),
    "into a value": (["train.epochs=3", "train.epochs.max=4"], "'epochs' is not a section"),
    "bad choice": (["ingest.on_error=ignore"], "'raise' or 'skip'"),
    "split sum": (["ingest.split.train=0.9"], "adjust ingest.split"),
    "image size vs depth": (["model.depth=5", "train.image_size=32"], "set train.image_size to 64"),
    "serve sides": (["serve.min_side=5000"], "lower min_side or raise max_side"),
    "tracking store": (["runtime.mlflow_tracking_uri=ftp://host"], "set http(s)://host:port"),
    "other_task per type": (["meta_train.enabled=true", "meta_train.per_lesion_type=true",
                             "meta_train.query_from=other_task"],
                            "set meta_train.query_from: same_task"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_a_bad_override_is_named(case, outside, capsys):
    overrides, says = OVERRIDES[case]
    rc, err = run_cli(["run", *[a for o in overrides for a in ("--set", o)]], capsys)
    assert_named(rc, err, ConfigError, says)
    assert "no params.yaml here: built-in defaults" in err
    assert list(outside.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("named", ["nope.yaml", "."])
def test_a_named_params_file_that_is_missing_is_an_error_not_the_defaults(named, outside, capsys):
    rc, err = run_cli(["ingest", "--out", "ds", "--params", named], capsys)
    assert_named(rc, err, ConfigError, "params file", "leave --params out for the built-in defaults")


def test_serve_options_are_validated_like_the_serve_section(outside, capsys):
    rc, err = run_cli(["serve", "--port", "70000"], capsys)
    assert_named(rc, err, ConfigError, "serve.port")


def test_compile_to_a_path_kfp_cannot_write(outside, capsys):
    rc, err = run_cli(["compile", "--out", str(outside)], capsys)
    assert_named(rc, err, ConfigError, "must be a .yaml file")


# --- ingest: sources and metadata --------------------------------------------------------------

def _copy_with(source: Path, dest: Path, csv: bytes | None = None, junk_image: bool = False) -> Path:
    shutil.copytree(source, dest)
    if csv is not None:
        (dest / "metadata.csv").write_bytes(csv)
    if junk_image:
        (dest / "images" / "zz.png").write_bytes(b"not a png")
    return dest


def _metadata(source: Path) -> list[str]:
    return (source / "metadata.csv").read_text().splitlines()


SOURCES = {
    "empty metadata": (lambda m: b"", {}, MetadataError, "column 'id' (columns.id) is missing"),
    "missing column": (lambda m: "\n".join(r.rsplit(",", 1)[0] for r in m).encode(),
                       {"ingest.columns.area_error": "area_error"}, MetadataError,
                       "column 'area_error' (columns.area_error) is missing"),
    "not utf-8": (lambda m: "\n".join(m).replace("round", "r\xf6und").encode("latin-1"), {},
                  MetadataError, "save it as UTF-8 CSV"),
    "binary": (lambda m: bytes(range(256)) * 4, {}, MetadataError, "is not UTF-8"),
    "duplicate ids": (lambda m: "\n".join([*m, m[1]]).encode(), {}, MetadataError, "appears twice"),
    "unknown ids": (lambda m: "\n".join([*m, "ghost" + m[1][m[1].index(","):]]).encode(), {},
                    MetadataError, "match no image: ghost"),
    "bad frame": (lambda m: "\n".join(m).encode(), {"ingest.columns.frame": "lesion_type"},
                  MetadataError, "is not an integer"),
}


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_a_malformed_metadata_csv_is_named(case, source, outside, capsys):
    make_csv, extra, expected, says = SOURCES[case]
    src = _copy_with(source, outside / "src", csv=make_csv(_metadata(source)))
    sets = [a for k, v in extra.items() for a in ("--set", f"{k}={v}")]
    rc, err = run_cli(["ingest", "--out", "ds", "--source", str(src), *META, *sets], capsys)
    assert_named(rc, err, expected, says)
    assert not (outside / "ds").exists()


def test_missing_metadata_csv_and_source_folder_are_named(source, outside, capsys):
    src = _copy_with(source, outside / "src")
    (src / "metadata.csv").unlink()
    rc, err = run_cli(["ingest", "--out", "ds", "--source", str(src), *META], capsys)
    assert_named(rc, err, MetadataError, "does not exist", "ingest.metadata_csv")
    rc, err = run_cli(["ingest", "--out", "ds", "--source", str(outside / "nowhere")], capsys)
    assert_named(rc, err, EmptySourceError, "does not exist")
    (outside / "empty" / "images").mkdir(parents=True)
    rc, err = run_cli(["ingest", "--out", "ds", "--source", str(outside / "empty")], capsys)
    assert_named(rc, err, EmptySourceError, "has no images under 'images'")


def test_an_undecodable_image_and_a_used_output_folder_are_named(source, outside, capsys):
    src = _copy_with(source, outside / "src", junk_image=True)
    rc, err = run_cli(["ingest", "--out", "ds", "--source", str(src)], capsys)
    assert_named(rc, err, UnreadableImageError, "zz.png")
    rc, err = run_cli(["ingest", "--out", str(source), "--source", str(source)], capsys)
    assert_named(rc, err, IngestError, "not empty")


def test_an_unreachable_s3_source_is_named(outside, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    rc, err = run_cli(["ingest", "--out", "ds", "--source", "s3://bucket/data",
                       "--set", f"runtime.s3_endpoint_url=http://127.0.0.1:{free_port()}"], capsys)
    assert_named(rc, err, IngestError, "cannot list ingest source s3://bucket/data",
                 "runtime.s3_endpoint_url")


@pytest.mark.parametrize("command", [
    ["export", "--dataset", "{src}", "--format", "json", "--out", "e"],
    ["weaken", "--dataset", "{src}", "--out", "w"],
])
def test_a_folder_that_is_no_dataset_is_named(command, source, outside, capsys):
    rc, err = run_cli([a.format(src=source) for a in command], capsys)
    assert_named(rc, err, DatasetError, "manifest.jsonl is missing", "lesionflow ingest --out")


def test_export_of_missing_predictions_is_named(outside, capsys):
    rc, err = run_cli(["export", "--predictions", "nowhere", "--format", "coco", "--out", "e"], capsys)
    assert_named(rc, err, ExportError, "predictions.jsonl not found")


# --- the registry: versions, corrections, serving ----------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh embedded store holding version 1 of model ``m`` (untrained) and no champion; the
    ``--set`` options that point the CLI at it."""
    from lesionflow.models.segmenter import Segmenter
    from lesionflow.models.unet import UNet

    root = tmp_path_factory.mktemp("store")
    sets = [f"runtime.workdir={root}", "runtime.model_name=m", "runtime.service_wait_seconds=0"]
    old_uri = mlflow.get_tracking_uri()
    tracking.connect(config.load(None, sets))
    tags = {lineage.TAG_DATASET_MD5: "d.dir", lineage.TAG_PARAMS_HASH: "p", lineage.TAG_PIPELINE_RUN_ID: "r"}
    with mlflow.start_run():
        registry.register_model(Segmenter(UNet(3, 4, 1), 16, [120.0] * 3, [60.0] * 3).eval(),
                                name="m", lineage=tags, metrics={})
    mlflow.set_tracking_uri(old_uri)
    yield [a for s in sets for a in ("--set", s)]
    mlflow.set_tracking_uri(old_uri)


def _batch(folder: Path, csv: bytes | None = None, mask: bool = True) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "images" / "a.png")
    if mask:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "masks" / "a.png")
    if csv is not None:
        (folder / "corrections.csv").write_bytes(csv)
    return folder


REGISTRY = {
    "evaluate a missing version": (["evaluate", "--model", "99"], RegistryError,
                                   "has no version '99'; existing versions: 1"),
    "evaluate without a champion": (["evaluate"], RegistryError, "has no alias 'champion'"),
    "serve a missing version": (["serve", "--model", "99", "--port", "0"], RegistryError,
                                "has no version '99'"),
    "serve without a champion": (["serve", "--port", "0"], RegistryError, "has no alias 'champion'"),
    "reproduce a missing version": (["reproduce", "99"], RegistryError, "has no version '99'"),
    "reproduce without lineage": (["reproduce", "1"], errors.ReproduceError, "without its params"),
    "rollback to a missing version": (["rollback", "--to", "99"], RegistryError, "has no version '99'"),
    "rollback without history": (["rollback"], RegistryError, "no earlier champion"),
    "evaluate on an empty split": (["evaluate", "--model", "1", "--source", "{src}",
                                    "--set", "ingest.split.train=0.85", "--set", "ingest.split.test=0"],
                                   EmptySplitError, "give ingest.split.test a share > 0"),
}


@pytest.mark.parametrize("case", sorted(REGISTRY))
def test_a_registry_request_that_cannot_be_met_is_named(case, store, source, outside, capsys):
    argv, expected, says = REGISTRY[case]
    rc, err = run_cli([*(a.format(src=source) for a in argv), *store], capsys)
    assert_named(rc, err, expected, says)


CORRECTIONS = {
    "junk image": (lambda d: (_batch(d), (d / "images" / "a.png").write_bytes(b"junk")),
                   ["--model-version", "1"], UnreadableImageError, "a.png"),
    "no corrected mask": (lambda d: _batch(d, mask=False), ["--model-version", "1"], CorrectionError,
                          "without a corrected mask"),
    "no model version": (lambda d: _batch(d), [], CorrectionError, "pass --model-version"),
    "a model version that does not exist": (lambda d: _batch(d), ["--model-version", "99"],
                                            RegistryError, "has no version '99'"),
    "csv without id column": (lambda d: _batch(d, b"name,model_version\na,1\n"), [], CorrectionError,
                              "no id column"),
    "csv not utf-8": (lambda d: _batch(d, b"id,model_version,reviewer\na,1,J\xf6rg\n"), [],
                      CorrectionError, "save it as UTF-8"),
    "missing folder": (lambda d: None, ["--model-version", "1"], EmptySourceError, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CORRECTIONS))
def test_a_bad_corrections_batch_is_named(case, store, outside, capsys):
    make, extra, expected, says = CORRECTIONS[case]
    make(outside / "batch")
    rc, err = run_cli(["corrections", "add", "--source", str(outside / "batch"), *extra, *store], capsys)
    assert_named(rc, err, expected, says)


def test_an_unreachable_tracking_server_is_named(outside, capsys):
    rc, err = run_cli(["history", "--set", f"runtime.mlflow_tracking_uri=http://127.0.0.1:{free_port()}",
                       "--set", "runtime.service_wait_seconds=0"], capsys)
    assert_named(rc, err, ServiceUnavailableError, "runtime.mlflow_tracking_uri")


def test_an_unreachable_kfp_endpoint_is_named(outside, capsys):
    rc, err = run_cli(["submit", "--host", f"http://127.0.0.1:{free_port()}",
                       "--set", "runtime.mlflow_tracking_uri=http://mlflow:5000",
                       "--set", "runtime.dvc_remote=s3://bucket/datasets"], capsys)
    assert_named(rc, err, ServiceUnavailableError, "the KFP endpoint", "check --host")


def test_serve_on_a_port_in_use_is_named(store, outside, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, err = run_cli(["serve", "--model", "1", "--port", str(busy.getsockname()[1]), *store], capsys)
    assert_named(rc, err, LesionflowError, "in use")


# --- the installed command: stderr holds no traceback ------------------------------------------

def _command(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([LESIONFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, expected, says", [
    (["ingest", "--out", "ds", "--set", "train.epoch=3"], ConfigError, "train.epoch: unknown key"),
    (["ingest", "--out", "ds", "--source", "nowhere"], EmptySourceError, "does not exist"),
    (["export", "--dataset", ".", "--format", "json", "--out", "e"], DatasetError, "not a canonical"),
])
def test_the_command_reports_mistakes_without_a_traceback(args, expected, says, tmp_path):
    proc = _command(args, tmp_path)
    assert_named(proc.returncode, proc.stderr, expected, says)


@pytest.mark.slow
def test_a_failing_pipeline_step_is_named_not_a_task_failure(source, tmp_path):
    """kfp.local only says "task 'ingest' failed"; the step's own error reaches the user."""
    bad = _copy_with(source, tmp_path / "src", csv=b"id,lesion_type\nstill_0000,round\nstill_0000,x\n")
    proc = _command(["run", "--source", str(bad), "--set", "ingest.metadata_csv=metadata.csv",
                     "--set", "ingest.columns.lesion_type=lesion_type"], tmp_path)
    assert_named(proc.returncode, proc.stderr, MetadataError, "appears twice", "in pipeline step ingest")


# --- outside the repository: the built-in defaults -------------------------------------------

SMALL = ["synthetic.n_images=12", "synthetic.n_videos=1", "synthetic.frames_per_video=4",
         "synthetic.n_weak=2", "synthetic.size=32"]


def _no_stray_stores(folder: Path, workdir: Path) -> None:
    """MLflow's fall-backs (./mlflow.db, ./mlruns) must never appear outside the workdir."""
    stray = [p for p in folder.rglob("*") if p.name in ("mlflow.db", "mlruns") and workdir not in p.parents]
    assert not stray, stray


def test_ingest_runs_from_an_empty_folder_on_the_built_in_defaults(tmp_path):
    assert not (tmp_path / "params.yaml").exists() and REPO not in tmp_path.parents
    proc = _command(["ingest", "--out", "dataset", *[a for s in SMALL for a in ("--set", s)]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no params.yaml here: built-in defaults" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "dataset" / "manifest.jsonl").is_file() and "weak 2" in proc.stdout
    _no_stray_stores(tmp_path, tmp_path / ".lesionflow")


@pytest.mark.slow
def test_run_works_from_an_empty_folder_on_the_built_in_defaults(tmp_path):
    """The installed tool has defaults of its own: `lesionflow run` (shrunken) outside the repository
    keeps everything under ./.lesionflow — no ./mlflow.db, no ./mlruns."""
    tiny = [*SMALL, "model.base_channels=4", "model.depth=2", "train.image_size=32", "train.epochs=1",
            "meta_train.outer_steps=2", "meta_train.rerank_every=2", "meta_train.support_size=2",
            "meta_train.query_size=2", "video.image_size=32", "video.base_channels=4", "video.depth=2",
            "video.max_steps=2", "weak_label.epochs=1", "weak_label.n_superpixels=8",
            "evaluate.n_overlays=1"]
    proc = _command(["run", *[a for s in tiny for a in ("--set", s)]], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lesionflow run finished" in proc.stdout and "no params.yaml here" in proc.stderr
    assert (tmp_path / ".lesionflow" / "mlflow.db").is_file()
    _no_stray_stores(tmp_path, tmp_path / ".lesionflow")
