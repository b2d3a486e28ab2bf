"""Ingest step: source → canonical dataset → DVC version pushed to the remote."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from lesionflow import corrections, lineage, timing, tracking
from lesionflow.config import MetadataColumns, Params
from lesionflow.corrections import CorrectionsVersion
from lesionflow.data import synthetic
from lesionflow.data.deid import load_key
from lesionflow.data.ingest import IngestReport, ingest
from lesionflow.data.manifest import FINGERPRINT
from lesionflow.versioning import DatasetVersion, version_dataset


@dataclass
class IngestOutcome:
    report: IngestReport
    version: DatasetVersion
    corrections: CorrectionsVersion | None = None


def build_dataset(params: Params, out_dir: Path) -> IngestReport:
    """Write the canonical dataset; ``source: synthetic`` first renders the synthetic source
    folder and then goes through exactly the same generic ingestion as user data. The pseudonym
    key is resolved first, so a cluster run without one stops before reading anything."""
    cfg = params.ingest
    key = load_key(params.runtime.resolved_workdir())
    if cfg.source != "synthetic":
        return ingest(cfg, out_dir, endpoint_url=params.runtime.s3_endpoint_url, key=key)
    with tempfile.TemporaryDirectory(prefix="lesionflow-synthetic-") as tmp:
        root = synthetic.make_synthetic_source(params.synthetic, Path(tmp))
        cfg = cfg.model_copy(update={
            "source": str(root), "metadata_csv": synthetic.METADATA_CSV,
            "columns": MetadataColumns(**synthetic.COLUMNS), "folder_fields": []})
        return ingest(cfg, out_dir, key=key)


def version_and_log(params: Params, dataset_dir: Path, role: str = "ingested") -> DatasetVersion:
    """DVC-version a finished dataset, push it, and put its identity in the active MLflow run: the
    tag of its ``role`` (``lineage.DATASET_TAGS``), a dataset input, and the .dvc file.
    With ``ingest.layout: shards`` the version holds the dataset's shards, not its files (the
    step's output stays in the files layout the next steps read)."""
    timing.mark("compute")  # the step's work until now; DVC's is timed on its own
    with tempfile.TemporaryDirectory(prefix=".shards-", dir=dataset_dir.parent) as tmp:
        stored = dataset_dir
        if params.ingest.layout == "shards":
            # torch and webdataset: imported only here
            from lesionflow.data.shards import write_shards

            stored = Path(tmp) / "dataset"
            write_shards(dataset_dir, stored, params.ingest.shard_mb)
            timing.mark("shards")
        version = version_dataset(stored, remote=params.runtime.remote(),
                                  endpoint_url=params.runtime.s3_endpoint_url,
                                  workspace=params.runtime.resolved_workdir() / "dvc-workspace",
                                  retry_seconds=params.runtime.service_wait_seconds)
    timing.mark("dvc version")
    mlflow.set_tag(lineage.DATASET_TAGS[role], version.md5)
    mlflow.log_param("dvc.remote", version.remote)
    mlflow.log_artifact(str(dataset_dir / FINGERPRINT))
    mlflow.log_text(version.dvc_file, "dataset.dvc.yaml")  # .yaml: the artifact browser previews it
    tracking.log_dataset_input(params, version.md5, role, context=role)
    return version


def run(params: Params, out_dir: Path) -> IngestOutcome:
    """Build (plus the reviewers' corrections ``corrections.dataset`` names), version and log; the
    DVC hash becomes the dataset's identity downstream."""
    used = corrections.resolve(params)
    if used is None:
        report = build_dataset(params, out_dir)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ingest-", dir=out_dir.parent) as tmp:
            report = build_dataset(params, Path(tmp) / "dataset")
            merged = corrections.merge(Path(tmp) / "dataset",
                                       corrections.restore(params, used.md5, Path(tmp) / "corrections"),
                                       out_dir)
        print(f"corrections {used.md5}: {merged.added} added to train, {merged.replaced} train "
              f"masks superseded, {len(merged.held_out)} of val/test images kept out")
        mlflow.log_metrics({"corrections_added": merged.added, "corrections_replaced": merged.replaced,
                            "corrections_held_out": len(merged.held_out)})
    mlflow.set_tag(lineage.TAG_CORRECTIONS_MD5, used.md5 if used else lineage.NONE)
    version = version_and_log(params, out_dir)
    mlflow.log_param("ingest.source", params.ingest.source)
    mlflow.log_metrics({"n_records": report.n_records, "n_skipped": len(report.skipped)})
    mlflow.log_dict(report.model_dump(mode="json"), "ingest_report.json")
    return IngestOutcome(report, version, used)
