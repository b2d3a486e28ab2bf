"""Reviewers' corrected masks: accepted in batches, versioned, mixed into the next training run.

A batch is a folder or S3 prefix in the ingest layout (or a reviewer tool's export, read into it
first: ``lesionflow/formats/``)::

    images/<id>.<ext>     the image the model was shown
    masks/<id>.png        the reviewer's corrected mask (required for every image)
    corrections.csv       optional: id, lesion_type, model_version (the version that predicted),
                          reviewer (who corrected the mask; default: the one adding the batch)

It is validated by the ingest code itself (same formats, same named errors). Every accepted
batch makes a *new* version of one cumulative corrections dataset — the previous version's
records plus this batch's, a re-corrected id replacing its older correction — written fresh,
DVC-versioned and pushed, so nothing stored earlier is ever rewritten. Versions are recorded as
runs of the MLflow experiment ``<model>-corrections`` (tags: DVC hash, count; artifact: the
manifest), which the CLI, the pipeline on a cluster and the retrain schedule all share.

Adds from several reviewers (processes, pods) take turns under the model's ``corrections`` lease
on the tracking server: read newest version → build → DVC version → record, so each new version
holds every batch recorded before it; an add that waits longer than ``LEASE_WAIT`` fails with
LeaseHeldError having recorded nothing.
"""

from __future__ import annotations

import csv
import getpass
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from lesionflow import lease, lineage, tracking
from lesionflow.config import IngestConfig, MetadataColumns, Params, SplitFractions
from lesionflow.data.deid import load_key
from lesionflow.data.fingerprint import write_index
from lesionflow.data.ingest import ingest
from lesionflow.data.manifest import (
    MANIFEST,
    Record,
    link_files,
    link_or_copy,
    read_manifest,
    staged_dataset,
)
from lesionflow.data.sources import materialize_source
from lesionflow.errors import CorrectionError
from lesionflow.lineage import (
    TAG_CORRECTIONS_MD5,
    TAG_N_ADDED,
    TAG_N_CORRECTIONS,
    TAG_REVIEWER,
    TAG_SOURCE,
)
from lesionflow.versioning import restore_dataset, version_dataset

CSV = "corrections.csv"
ID_PREFIX = "correction-"
LEASE = "corrections"  # the lease resource: one add at a time per model
LEASE_TTL = 60.0  # seconds an add that died blocks the next one (a live one renews every ttl/3)
LEASE_WAIT = 300.0  # seconds an add waits for a concurrent one (a few adds' worth) before giving up


@dataclass(frozen=True)
class CorrectionsVersion:
    md5: str
    n_corrections: int
    run_id: str


@dataclass(frozen=True)
class MergeReport:
    added: int  # corrections added to the train split
    replaced: int  # train records whose image a correction supersedes
    held_out: list[str]  # corrections of val/test images: kept out of training (no leak)


def experiment_name(params: Params) -> str:
    return f"{params.runtime.model_name}-corrections"


def add(params: Params, source: str, *, model_version: str | None = None,
        reviewer: str | None = None, fmt: str = "folder") -> CorrectionsVersion:
    """Validate a batch and record the corrections dataset version that includes it.

    ``reviewer`` (default ``default_reviewer()``) goes on each correction as ``labelled_by``
    unless the batch's CSV (or the tool export: Label Studio's ``completed_by``, CVAT's assignee)
    names another per row. ``fmt`` other than ``folder`` (``label-studio``, ``cvat``, ``coco``)
    reads a reviewer tool's export first (``formats/review.py``), into this same layout."""
    # imported here: it loads torch, which the ingest step (it imports this module) never needs
    from lesionflow import registry

    name = params.runtime.model_name
    reviewer = (reviewer or "").strip() or default_reviewer()
    with tempfile.TemporaryDirectory(prefix="lesionflow-corrections-") as tmp:
        tmp = Path(tmp)
        root = materialize_source(source, params.runtime.s3_endpoint_url, tmp / "source")
        if fmt != "folder":
            from lesionflow.formats.review import read_corrections

            root = read_corrections(fmt, root, tmp / "from-tool")
            source = f"{source} ({fmt} export)"
        predicted_by = _column(root, "model_version")
        reviewed_by = _column(root, "reviewer")
        batch_dir = tmp / "batch"
        ingest(_batch_config(params, root), batch_dir, key=load_key(params.runtime.resolved_workdir()))
        batch = read_manifest(batch_dir)
        _check_batch(batch, predicted_by, model_version)
        for version in sorted({predicted_by.get(r.id, model_version) for r in batch}):
            registry.version_info(name, version)  # RegistryError naming the existing versions

        holder = (f"corrections add by {reviewer} on {socket.gethostname()} pid {os.getpid()} "
                  f"({uuid.uuid4().hex[:8]})")
        with lease.held(name, LEASE, holder, ttl=LEASE_TTL, wait=LEASE_WAIT,
                        owner=lease.process_identity()) as held:  # killed: taken over at once
            previous = latest(params)
            merged = tmp / "corrections"
            with staged_dataset(merged) as stage:
                records = [_as_correction(r, predicted_by.get(r.id, model_version),
                                          reviewed_by.get(r.id, reviewer), batch_dir, stage)
                           for r in batch]
                if previous is not None:
                    old_dir = restore(params, previous.md5, tmp / "previous")
                    fresh = {r.id for r in records}
                    records += [_copy(r, old_dir, stage) for r in read_manifest(old_dir) if r.id not in fresh]
                write_index(stage, records)
            version = version_dataset(merged, remote=params.runtime.remote(),
                                      endpoint_url=params.runtime.s3_endpoint_url,
                                      workspace=params.runtime.resolved_workdir() / "dvc-workspace",
                                      retry_seconds=params.runtime.service_wait_seconds)
            reviewers = sorted({reviewed_by.get(r.id, reviewer) for r in batch})
            return _record_version(params, version.md5, merged, source, added=len(batch),
                                   reviewers=reviewers, held=held)


def default_reviewer() -> str:
    """Who corrected a batch when nobody says: LESIONFLOW_USER (set in pods), else the login name."""
    return os.environ.get("LESIONFLOW_USER") or getpass.getuser()


def latest(params: Params) -> CorrectionsVersion | None:
    """The newest completely recorded corrections version, or None before the first batch."""
    runs = _runs(params, "attributes.status = 'FINISHED'", max_results=1)
    return _version_of(runs[0]) if runs else None


def find(params: Params, md5: str) -> CorrectionsVersion:
    runs = _runs(params, f"attributes.status = 'FINISHED' and tags.`{TAG_CORRECTIONS_MD5}` = '{md5}'", 1)
    if not runs:
        raise CorrectionError(f"{md5} is not a recorded corrections version of "
                              f"{params.runtime.model_name} (see `lesionflow corrections status`)")
    return _version_of(runs[0])


def resolve(params: Params) -> CorrectionsVersion | None:
    """The version ``corrections.dataset`` names: ``latest``, a hash, or None (``null``)."""
    ref = params.corrections.dataset
    if ref is None:
        return None
    return latest(params) if ref == "latest" else find(params, ref)


def restore(params: Params, md5: str, dest: Path) -> Path:
    return restore_dataset(md5, dest, remote=params.runtime.remote(),
                           endpoint_url=params.runtime.s3_endpoint_url,
                           retry_seconds=params.runtime.service_wait_seconds)


def count_new(params: Params, version: CorrectionsVersion, since_md5: str | None) -> int:
    """Corrections in ``version`` that ``since_md5`` did not hold (by id and mask content): the
    ones a model trained on ``since_md5`` has never seen."""
    current = _entries(version.run_id)
    if since_md5 in (None, lineage.NONE):
        return len(current)
    return len(current - _entries(find(params, since_md5).run_id))


def merge(dataset_dir: Path, corrections_dir: Path, out_dir: Path) -> MergeReport:
    """Write ``out_dir``: the dataset plus the corrections in its train split.

    A correction of an image (same pixels) that sits in train replaces that record's mask; a
    correction of a val/test image stays out, since training on it would leak the test set."""
    records = read_manifest(dataset_dir)
    where = {r.image_sha256: r.split for r in records}
    corrections = read_manifest(corrections_dir)
    held_out = [c.id for c in corrections if where.get(c.image_sha256, "train") != "train"]
    used = [c for c in corrections if c.id not in held_out]
    superseded = {c.image_sha256 for c in used}
    kept = [r for r in records if not (r.split == "train" and r.image_sha256 in superseded)]
    with staged_dataset(out_dir) as stage:
        out = [_copy(r, dataset_dir, stage) for r in kept]
        out += [_copy(c, corrections_dir, stage) for c in used]
        write_index(stage, out)
    return MergeReport(added=len(used), replaced=len(records) - len(kept), held_out=held_out)


def _batch_config(params: Params, root: Path) -> IngestConfig:
    columns = _csv_columns(root)
    return IngestConfig(
        source=str(root), metadata_csv=CSV if columns else None,
        columns=MetadataColumns(id="id", lesion_type="lesion_type" if "lesion_type" in columns else None),
        default_lesion_type=params.ingest.default_lesion_type, max_side=params.ingest.max_side,
        split=SplitFractions(train=1.0, val=0.0, test=0.0), split_seed=params.ingest.split_seed)


def _csv_rows(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of the batch's ``corrections.csv`` (none if absent); a file that is not
    UTF-8 CSV with an ``id`` column is a ``CorrectionError``."""
    if not (root / CSV).is_file():
        return [], []
    try:
        with open(root / CSV, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise CorrectionError(f"{CSV} of the batch is not a UTF-8 CSV ({err}): save it as UTF-8 "
                              "CSV with an id column") from None
    if rows and "id" not in header:
        raise CorrectionError(f"{CSV} of the batch has no id column (it has {header}): name the "
                              "column of image ids id")
    return header, rows


def _csv_columns(root: Path) -> set[str]:
    return set(_csv_rows(root)[0])


def _column(root: Path, column: str) -> dict[str, str]:
    """id → the non-empty cells of ``column`` in ``corrections.csv`` (other rows use the default)."""
    header, rows = _csv_rows(root)
    if column not in header:
        return {}
    return {row["id"]: row[column].strip() for row in rows if (row.get(column) or "").strip()}


def _check_batch(batch: list[Record], predicted_by: dict[str, str], default: str | None) -> None:
    no_mask = sorted(r.id for r in batch if r.mask is None)
    if no_mask:
        raise CorrectionError(f"{len(no_mask)} correction(s) without a corrected mask in masks/: "
                              f"{', '.join(no_mask[:5])}")
    no_version = sorted(r.id for r in batch if r.id not in predicted_by and default is None)
    if no_version:
        raise CorrectionError(
            f"no model version for {', '.join(no_version[:5])}: pass --model-version or fill the "
            f"model_version column of {CSV} (the version whose prediction was corrected)")


def _as_correction(record: Record, predicted_by: str, reviewer: str, src: Path, stage: Path
                   ) -> Record:
    new_id = record.id if record.id.startswith(ID_PREFIX) else ID_PREFIX + record.id
    image, mask = f"images/{new_id}.png", f"masks/{new_id}.png"
    link_or_copy(src / record.image, stage / image)
    link_or_copy(src / record.mask, stage / mask)
    return record.model_copy(update={
        "id": new_id, "kind": "correction", "split": "train", "image": image, "mask": mask,
        "group": ID_PREFIX + record.group, "corrected_from": str(predicted_by),
        "labelled_by": f"reviewer:{reviewer}"})


def _copy(record: Record, src: Path, stage: Path) -> Record:
    link_files(record, src, stage)
    return record


def _record_version(params: Params, md5: str, dataset: Path, source: str, *, added: int,
                    reviewers: list[str], held: lease.Lease) -> CorrectionsVersion:
    """One MLflow run per version; it only counts as recorded once FINISHED (artifact logged),
    and only while the lease is still ours: had it been lost, another add may already have built
    on the previous version without this batch."""
    client = MlflowClient()
    experiment_id = tracking.experiment_id(experiment_name(params))
    n = len(read_manifest(dataset))
    run = client.create_run(experiment_id, run_name=f"corrections {md5[:8]} (+{added})",
                            tags={TAG_CORRECTIONS_MD5: md5, TAG_N_CORRECTIONS: str(n), TAG_SOURCE: source,
                                  TAG_N_ADDED: str(added), TAG_REVIEWER: ", ".join(reviewers)})
    try:
        client.log_text(run.info.run_id, (dataset / MANIFEST).read_text(), MANIFEST)
        held.check()
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return CorrectionsVersion(md5, n, run.info.run_id)


def _runs(params: Params, filter_string: str, max_results: int) -> list:
    experiment = mlflow.get_experiment_by_name(experiment_name(params))
    if experiment is None:
        return []
    return MlflowClient().search_runs([experiment.experiment_id], filter_string,
                                      order_by=["attributes.start_time DESC"],
                                      max_results=max_results)


def _version_of(run) -> CorrectionsVersion:
    return CorrectionsVersion(run.data.tags[TAG_CORRECTIONS_MD5], int(run.data.tags[TAG_N_CORRECTIONS]),
                              run.info.run_id)


def _entries(run_id: str) -> set[tuple[str, str | None]]:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{MANIFEST}")
    records = [Record.model_validate_json(line) for line in text.splitlines() if line]
    return {(r.id, r.mask_sha256) for r in records}
