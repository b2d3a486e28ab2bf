"""What every method comparison under ``bench/`` shares: cache keys, cached datasets, and the
mean (min–max) cell its tables report.

A cache entry's key is a digest of everything that changes its content — the params that matter,
the source data's manifest and the package code that builds it — so a cached dataset is reused
only when rebuilding it would give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import mlflow
import numpy as np
from filelock import FileLock

import lesionflow
from lesionflow import config
from lesionflow.steps.ingest import build_dataset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LESIONFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
# the package that runs, which is not always this checkout's: MLflow imports the installed one
# at start-up (its store plugins), so a second checkout would otherwise hash code it does not run
PACKAGE = Path(lesionflow.__file__).resolve().parent
# the package code a cached dataset depends on besides its params
INGEST_CODE = ["data/*.py", "steps/ingest.py"]


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(patterns: list[str], exclude: list[str] = ()) -> str:
    files = sorted(f for p in patterns for f in PACKAGE.glob(p) if str(f.relative_to(PACKAGE)) not in exclude)
    return digest([(str(f.relative_to(PACKAGE)), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files])


def package_code() -> str:
    """The package's code but ``config.py``: what its defaults change shows in the resolved params,
    so changing a default a run does not use keeps that run."""
    return code_digest(["**/*.py"], exclude=["config.py"])


def load_params(dataset: str, cache: Path, experiment: str, overrides: list[str]) -> config.Params:
    """``params.yaml`` + ``configs/<dataset>.yaml`` on the real data, logging to ``cache``'s own
    SQLite MLflow store; plain training unless an override says otherwise."""
    return config.load([REPO / "params.yaml", REPO / "configs" / f"{dataset}.yaml"], [
        f"ingest.source={DATA / dataset}", f"runtime.workdir={cache}", f"runtime.experiment={experiment}",
        "meta_train.enabled=false", *overrides])


def params_that_matter(params: config.Params) -> dict:
    """The resolved params a cached result depends on: where things live aside (runtime; the
    dataset's key stands for ``ingest.source``), so checkouts in different places share a cache."""
    return params.model_dump(mode="json", exclude={"runtime": True, "ingest": {"source"}})


def dataset_key(params: config.Params) -> str:
    """What the canonical dataset's content depends on: the ingest params (the split seed among
    them) but where the source lies, the source's content (its MANIFEST) and the ingest code — so
    checkouts in different places share a cache, and a report need not build the dataset."""
    source = Path(params.ingest.source)
    return digest(params.ingest.model_dump(exclude={"source"}), (source / "MANIFEST.sha256").read_text(),
                  code_digest(INGEST_CODE))


def cached_dataset(params: config.Params, cache: Path) -> tuple[Path, str]:
    """The canonical dataset for ``params.ingest``, built once per ``dataset_key``."""
    key, source = dataset_key(params), Path(params.ingest.source)
    out = cache / "datasets" / f"{source.name}-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):  # processes side by side build it once
        if not out.is_dir():
            t0 = time.monotonic()
            build_dataset(params, out)
            print(f"ingested {source.name} in {time.monotonic() - t0:.0f} s → {out}", flush=True)
    return out, key


def spread(values: list[float], fmt: str = ".3f") -> str:
    """``mean (min–max)`` over seeds; a lone value as is."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def log_epoch(row: dict) -> None:
    """Each epoch's numbers in the active MLflow run, stepped by epoch (the chart view's curves)."""
    mlflow.log_metrics({f"epoch/{k}": float(v) for k, v in row.items()
                        if isinstance(v, (int, float)) and k != "epoch"}, step=int(row["epoch"]))


def log_report(text: str, text_name: str, results: dict, plot_path: Path | None,
               draw: Callable[[dict, Path], None]) -> None:
    """A comparison's table, ``results.json`` and (with ``plot_path``) its plot in the active run."""
    mlflow.log_text(text, text_name)
    mlflow.log_dict(results, "results.json")
    if plot_path:
        draw(results, plot_path)
        mlflow.log_artifact(str(plot_path))


def nest_under(parent_run_id: str, run_ids: Iterable[str]) -> None:
    """Show runs made elsewhere (other processes, earlier sessions) nested under a parent: MLflow
    nests by the ``mlflow.parentRunId`` tag."""
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
