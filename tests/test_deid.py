"""PHI never leaves ingest: the PS3.15 basic profile per attribute class, keyed pseudonyms,
burned-in annotations refused, compressed transfer syntaxes decoded, and a whole pipeline run over
DICOMs full of PHI whose every written byte is searched for it."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import imagecodecs
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from lesionflow import config
from lesionflow.config import IngestConfig, MetadataColumns
from lesionflow.data import deid
from lesionflow.data.deid import (
    ACTIONS,
    KEY_ENV,
    KEY_FILE,
    Pseudonyms,
    deidentify,
    load_key,
)
from lesionflow.data.ingest import DICOM_HEADERS, ingest
from lesionflow.data.io import read_dicom
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import BurnedInAnnotationError, MetadataError, PseudonymKeyError
from lesionflow.steps.ingest import build_dataset
from tests.conftest import REPO
from tests.test_pipeline import TINY

KEY = b"test-pseudonym-key-0123456789abcdef"
PSEUDONYMS = Pseudonyms(KEY)

# PHI of the patient the tests write; every string is searched for in what ingest (or the whole
# pipeline) writes. The name is stored in the DICOM's own encoding (ISO_IR 100, Latin-1).
FAMILY, GIVEN = "Quaglieri", "Józefina"
FILE_NAME = "Quaglieri_Jozefina"  # what a PACS export names files and folders after
PHI = {
    "PatientName": f"{FAMILY}^{GIVEN}",
    "PatientID": "PID-55012987",
    "PatientBirthDate": "19470316",
    "OtherPatientIDs": "MRN-44190273",
    "PatientAddress": "Lindenallee 17, Quedlinburg",
    "PatientTelephoneNumbers": "+49-3946-771234",
    "InstitutionName": "Sankt Wendelin Klinikum",
    "InstitutionAddress": "Wendelinstrasse 3, Halberstadt",
    "ReferringPhysicianName": "Hargreave^Ottoline",
    "PerformingPhysicianName": "Vasquez-Oyelaran^Teodor",
    "OperatorsName": "Brannigan^Philippa",
    "AccessionNumber": "ACC99120347",
    "StudyID": "STU-8812",
    "StudyDate": "20190823",
    "SeriesDate": "20190824",
    "AcquisitionDate": "20190825",
    "ContentDate": "20190826",
    "StudyDescription": "Quaglieri follow-up",
    "StationName": "WENDELIN-CT2",
    "DeviceSerialNumber": "SN-7781-XQ",
}
SEARCHED = [FAMILY, GIVEN, FILE_NAME, *(v for k, v in PHI.items() if k != "PatientName"),
            "Hargreave", "Ottoline", "Vasquez-Oyelaran", "Brannigan"]


def phi_dataset(pixels: np.ndarray, patient_id: str = PHI["PatientID"], study_uid: str = "",
                **attrs) -> Dataset:
    """A CT-like image dataset carrying all of ``PHI``, a private block, a nested sequence with a
    name, an overlay and a curve."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.FrameOfReferenceUID = uid.generate_uid()
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    item = Dataset()  # a kept sequence holding what the profile removes, two levels deep
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D0050", "SRT", "Tissue"
    inner = Dataset()
    inner.PatientName = PHI["PatientName"]
    inner.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ReferencedInstanceSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item])
    request = Dataset()
    request.RequestedProcedureID = PHI["AccessionNumber"]
    ds.RequestAttributesSequence = Sequence([request])
    ds.private_block(0x0011, "ACME Scanner", create=True).add_new(0x01, "LO", PHI["PatientName"])
    ds.add_new(0x60000010, "US", 8)  # overlay rows
    ds.add_new(0x60003000, "OW", PHI["PatientID"].encode().ljust(16))  # overlay data
    ds.add_new(0x60004000, "LT", f"reviewed by {PHI['OperatorsName']}")  # overlay comments
    ds.add_new(0x50000020, "CS", "ECG")  # curve type (retired curves: group 50xx)
    ds.add_new(0x50003000, "OW", PHI["PatientID"].encode().ljust(16))  # curve data
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_with_lesion(seed: int, shape=(48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Stored values (HU + 1024) of soft tissue with a brighter disc, and the disc as mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(14, shape[0] - 14, 2)
    lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(5, 9) ** 2
    pixels = 1024 + 20 + rng.normal(0, 15, shape) + lesion * 120
    return np.clip(pixels, 0, 4095).astype(np.uint16), lesion


def values(ds: Dataset) -> str:
    """Every string value in a dataset, nested ones too, for "is it still there" checks."""
    return "\n".join(str(e.value) for e in ds.iterall() if e.VR != "SQ")


# --- the profile, per attribute class -----------------------------------------------------------

def test_names_are_removed_wherever_they_stand():
    ds = deidentify(phi_dataset(ct_with_lesion(0)[0]), PSEUDONYMS)
    assert not ds.PatientName and not ds.ReferringPhysicianName  # Z: present, empty
    assert "PerformingPhysicianName" not in ds and "OperatorsName" not in ds  # X
    inner = ds.AnatomicRegionSequence[0].ReferencedInstanceSequence[0]
    assert not inner.PatientName  # two levels down, in a sequence the profile keeps
    for name in (FAMILY, GIVEN, "Hargreave", "Vasquez", "Brannigan"):
        assert name not in values(ds)


def test_ids_become_keyed_pseudonyms_or_go():
    ds = deidentify(phi_dataset(ct_with_lesion(0)[0]), PSEUDONYMS)
    assert ds.PatientID == PSEUDONYMS.name(PHI["PatientID"])
    assert not ds.AccessionNumber and not ds.StudyID  # Z
    assert "OtherPatientIDs" not in ds and "DeviceSerialNumber" not in ds  # X
    assert ds.PatientIdentityRemoved == "YES" and "Basic Profile" in ds.DeidentificationMethod
    for key in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "DeviceSerialNumber"):
        assert PHI[key] not in values(ds)


def test_dates_and_places_are_removed():
    ds = deidentify(phi_dataset(ct_with_lesion(0)[0]), PSEUDONYMS)
    assert not ds.PatientBirthDate and not ds.StudyDate and not ds.ContentDate  # Z (Z/D)
    assert "SeriesDate" not in ds and "AcquisitionDate" not in ds  # X (X/D, X/Z)
    for key in ("InstitutionName", "InstitutionAddress", "PatientAddress", "StationName",
                "PatientTelephoneNumbers", "StudyDescription"):
        assert key not in ds
    for key in ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                "InstitutionName", "PatientAddress"):
        assert PHI[key] not in values(ds)
    assert ds.Modality == "CT" and ds.Manufacturer == "ACME"  # not identifying: kept


def test_uids_are_replaced_consistently_across_the_files_of_a_study():
    pixels = ct_with_lesion(0)[0]
    study = uid.generate_uid()
    first, second = phi_dataset(pixels, study_uid=study), phi_dataset(pixels, study_uid=study)
    second.FrameOfReferenceUID = first.FrameOfReferenceUID
    second.AnatomicRegionSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = (
        first.SOPInstanceUID)
    originals = {e.value for d in (first, second) for e in d.iterall() if e.VR == "UI"}
    originals |= {first.file_meta.MediaStorageSOPInstanceUID}
    a, b = deidentify(first, PSEUDONYMS), deidentify(second, PSEUDONYMS)

    assert a.StudyInstanceUID == b.StudyInstanceUID == PSEUDONYMS.uid(study)
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID  # meta header agrees
    # a reference inside a nested sequence still points at the (new) instance it referred to
    assert (b.AnatomicRegionSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            == a.SOPInstanceUID)
    replaced = {a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID, a.FrameOfReferenceUID}
    assert all(uid.UID(u).is_valid and len(u) <= 64 and u.startswith("2.25.") for u in replaced)
    assert not replaced & originals
    assert a.SOPClassUID == uid.CTImageStorage  # a class, not an instance: kept
    assert Pseudonyms(b"another key, just as long as the first").uid(study) != a.StudyInstanceUID


def test_private_tags_are_removed_nested_ones_too():
    ds = phi_dataset(ct_with_lesion(0)[0])
    ds.AnatomicRegionSequence[0].private_block(0x0029, "VENDOR X", create=True).add_new(
        0x10, "LO", PHI["PatientID"])
    deidentify(ds, PSEUDONYMS)
    assert not any(e.tag.is_private for e in ds.iterall())


def test_nested_sequences_are_cleaned_and_removed_ones_go_whole():
    ds = deidentify(phi_dataset(ct_with_lesion(0)[0]), PSEUDONYMS)
    assert "RequestAttributesSequence" not in ds  # X: gone with the accession number inside
    item = ds.AnatomicRegionSequence[0]  # kept: anatomy is not identifying
    assert item.CodeMeaning == "Tissue"
    inner = item.ReferencedInstanceSequence[0]
    assert not inner.PatientName and inner.ReferencedSOPInstanceUID.startswith("2.25.")


def test_overlays_and_curves_are_removed():
    ds = deidentify(phi_dataset(ct_with_lesion(0)[0]), PSEUDONYMS)
    assert 0x60003000 not in ds and 0x60004000 not in ds  # overlay data and comments
    assert not any(e.tag.group == 0x5000 for e in ds)  # every curve attribute
    assert ds[0x60000010].value == 8  # overlay geometry says nothing about anyone


def test_every_attribute_of_the_profile_table_gets_its_action():
    """All of PS3.15 Table E.1-1 (the edition dicom-anonymizer encodes), not only the usual
    suspects: each attribute pydicom knows, filled with a value, comes out as its action says."""
    sample = {"PN": "Secret^Name", "DA": "20200101", "TM": "101010", "DT": "20200101101010",
              "AS": "042Y", "DS": "1.5", "IS": "7", "FL": 1.5, "FD": 1.5, "AT": 0x00100010,
              "US": 7, "SS": 7, "UL": 7, "SL": 7, "UV": 7, "SV": 7}
    ds, expected = Dataset(), {}
    for tag, action in ACTIONS.items():
        if tag.group == 0x0002 or action == "P":
            continue  # the meta header and PatientID have their own tests
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue  # newer than pydicom's dictionary
        if vr == "SQ":
            item = Dataset()
            item.CodeMeaning = "SECRET"
            value = Sequence([item])
        elif vr == "UI":
            value = f"1.2.826.0.1.{tag.group}.{tag.element}"
        elif vr in deid.BINARY_VRS:
            value = b"SECRET!!"
        else:
            value = sample.get(vr, "SECRET")
        ds.add_new(tag, vr, value)
        expected[tag] = (action, value)
    assert len(expected) > 550
    deidentify(ds, PSEUDONYMS)
    for tag, (action, original) in expected.items():
        if action == "X":
            assert tag not in ds, tag
            continue
        value = ds[tag].value
        if action == "Z":
            assert value in ("", None, b"") or len(value) == 0, tag
        elif action == "U":
            assert value == PSEUDONYMS.uid(original), tag
        else:  # D: a dummy (a sequence is emptied)
            assert value != original and (ds[tag].VR == "SQ" or value not in ("", None)), tag


# --- keyed pseudonyms and the key -------------------------------------------------------------

def test_pseudonyms_are_keyed():
    patient = "100234"  # a numeric record number: an unkeyed hash is brute-forced in seconds
    assert PSEUDONYMS.name(patient) == Pseudonyms(KEY).name(patient)
    assert PSEUDONYMS.name(patient) != Pseudonyms(b"x" + KEY[1:]).name(patient)
    unkeyed = {"p-" + hashlib.sha256(str(n).encode()).hexdigest()[:k] for n in range(100000, 100300)
               for k in (12, 16)}
    assert PSEUDONYMS.name(patient) not in unkeyed
    assert PSEUDONYMS.name(patient) != PSEUDONYMS.name("100235")


def test_key_from_the_environment_or_a_local_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv(KEY_ENV, "k" * 40)
    assert load_key(tmp_path) == b"k" * 40
    assert not (tmp_path / KEY_FILE).exists()
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(PseudonymKeyError, match="at least 32"):
        load_key(tmp_path)

    monkeypatch.delenv(KEY_ENV)
    key = load_key(tmp_path / "work")  # local run: created once, then reused
    assert len(key) == 64 and load_key(tmp_path / "work") == key
    assert stat.S_IMODE((tmp_path / "work" / KEY_FILE).stat().st_mode) == 0o600
    assert load_key(tmp_path / "other") != key  # a workdir of its own, a key of its own


def test_a_run_on_a_cluster_refuses_to_start_without_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    params = config.load(REPO / "params.yaml", [f"runtime.workdir={tmp_path / 'work'}"])
    with pytest.raises(PseudonymKeyError, match=f"{KEY_ENV} is not set.*credentials Secret"):
        build_dataset(params, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists() and not (tmp_path / "work" / KEY_FILE).exists()
    assert KEY_ENV in config.ClusterConfig().secret_env  # the compiled pipeline maps it in


def test_a_dicom_source_needs_a_key(tmp_path):
    save(phi_dataset(ct_with_lesion(0)[0]), tmp_path / "src" / "images" / "a.dcm")
    with pytest.raises(PseudonymKeyError, match="holds DICOM"):
        ingest(IngestConfig(source=str(tmp_path / "src")), tmp_path / "out")


def test_pseudonymize_ids_covers_any_source(tmp_path):
    """PNGs in patient folders, a metadata CSV keyed by patient-named ids (one naming a volume
    slice) with a patient group column: with pseudonymize_ids, none of it reaches the dataset,
    every id still finds its row, and lesion types stay readable."""
    src = tmp_path / "src"
    rows = []
    for i in range(3):
        patient = f"{FILE_NAME}{i}"
        image, mask = ct_with_lesion(i)
        for k in range(2):
            stem = f"{patient}_{k}"
            (src / "images" / "polyp" / patient).mkdir(parents=True, exist_ok=True)
            (src / "masks" / "polyp" / patient).mkdir(parents=True, exist_ok=True)
            Image.fromarray((image // 16).astype(np.uint8)).save(
                src / "images" / "polyp" / patient / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                src / "masks" / "polyp" / patient / f"{stem}.png")
            rows.append({"id": stem, "patient": PHI["PatientID"] + str(i), "type": "nodule"})
    (src / "images" / "polyp" / "vol").mkdir()
    nrrd.write(str(src / "images" / "polyp" / "vol" / f"{FILE_NAME}_ct.nrrd"),
               np.random.default_rng(0).normal(100, 30, (16, 12, 3)).astype(np.float32))
    rows.append({"id": f"{FILE_NAME}_ct_s001", "patient": PHI["PatientID"], "type": "mass"})
    with open(src / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "patient", "type"])
        writer.writeheader()
        writer.writerows(rows)
    columns = MetadataColumns(id="id", group="patient", lesion_type="type")

    by_folder = IngestConfig(source=str(src), folder_fields=["lesion_type", "group"])
    ingest(by_folder.model_copy(update={"pseudonymize_ids": True}), tmp_path / "folders",
           key=KEY)
    records = {r.id: r for r in read_manifest(tmp_path / "folders")}
    first = records[PSEUDONYMS.name(f"{FILE_NAME}0_0")]
    assert first.group == PSEUDONYMS.name(f"{FILE_NAME}0") and first.lesion_type == "polyp"
    assert first.source == f"images/polyp/{first.group}/{first.id}.png"
    assert first.kind == "still"

    cfg = IngestConfig(source=str(src), metadata_csv="meta.csv", columns=columns,
                       pseudonymize_ids=True)
    ingest(cfg, tmp_path / "csv", key=KEY)
    records = {r.id: r for r in read_manifest(tmp_path / "csv")}
    second = records[PSEUDONYMS.name(f"{FILE_NAME}1_0")]
    assert second.group == PSEUDONYMS.name(PHI["PatientID"] + "1")
    volume_slice = records[PSEUDONYMS.name(f"{FILE_NAME}_ct") + "_s001"]
    assert volume_slice.lesion_type == "mass"
    assert volume_slice.group == PSEUDONYMS.name(PHI["PatientID"])
    for out in (tmp_path / "folders", tmp_path / "csv"):
        for f in out.rglob("*"):
            assert FILE_NAME not in str(f.relative_to(out))
            assert f.is_dir() or all(s.encode() not in f.read_bytes()
                                     for s in (FILE_NAME, PHI["PatientID"]))

    ingest(by_folder, tmp_path / "plain")  # without the option, names are kept
    assert f"{FILE_NAME}0_0" in {r.id for r in read_manifest(tmp_path / "plain")}


def test_a_metadata_csv_the_view_cannot_rewrite_is_still_named(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "images" / "a.png")
    (src / "meta.csv").write_bytes(f"id,patient\na,{GIVEN}\n".encode("latin-1"))
    cfg = IngestConfig(source=str(src), metadata_csv="meta.csv", pseudonymize_ids=True,
                       columns=MetadataColumns(group="patient"))
    with pytest.raises(MetadataError, match=r"\(pseudonymized\)/meta.csv is not UTF-8"):
        ingest(cfg, tmp_path / "out", key=KEY)


# --- burned-in annotations ----------------------------------------------------------------------

def test_burned_in_annotation_is_refused_or_skipped_by_pseudonym(tmp_path):
    src = tmp_path / "src"
    save(phi_dataset(ct_with_lesion(0)[0]), src / "images" / f"{FILE_NAME}_1.dcm")
    save(phi_dataset(ct_with_lesion(1)[0], BurnedInAnnotation="YES"),
         src / "images" / f"{FILE_NAME}_2.dcm")
    burned = PSEUDONYMS.name(f"{FILE_NAME}_2")
    with pytest.raises(BurnedInAnnotationError,
                       match=f"{burned}.dcm says BurnedInAnnotation YES") as err:
        ingest(IngestConfig(source=str(src)), tmp_path / "raise", key=KEY)
    assert FILE_NAME not in str(err.value)
    assert not (tmp_path / "raise").exists()

    report = ingest(IngestConfig(source=str(src), on_error="skip"), tmp_path / "skip",
                    key=KEY)
    assert report.n_records == 1
    (skipped,) = report.skipped
    assert skipped["path"] == f"images/{burned}.dcm"
    assert skipped["reason"].startswith("BurnedInAnnotationError")
    assert FILE_NAME not in report.summary() and burned in report.summary()
    saved = json.loads((tmp_path / "skip" / "ingest_report.json").read_text())
    assert saved["skipped"] == report.skipped


# --- compressed transfer syntaxes ---------------------------------------------------------------

def _encapsulated(ds: Dataset, syntax: str, frame: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


ENCODERS = {
    "jpeg-lossless": (uid.JPEGLosslessSV1,
                      lambda px: imagecodecs.jpeg8_encode(px, lossless=True, bitspersample=12)),
    "jpeg-ls": (uid.JPEGLSLossless, imagecodecs.jpegls_encode),
    "jpeg-2000": (uid.JPEG2000Lossless,
                  lambda px: imagecodecs.jpeg2k_encode(px, level=0, codecformat="J2K",
                                                       reversible=True)),
}


@pytest.mark.parametrize("syntax", ENCODERS)
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax):
    """Encoded here with imagecodecs; decoded by the pylibjpeg plugins pydicom finds."""
    pixels = ct_with_lesion(3)[0]
    reference = read_dicom(save(phi_dataset(pixels), tmp_path / "plain.dcm"), PSEUDONYMS)
    transfer_syntax, encode = ENCODERS[syntax]
    path = save(_encapsulated(phi_dataset(pixels), transfer_syntax, encode(pixels)),
                tmp_path / "compressed.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax
    decoded = read_dicom(path, PSEUDONYMS)
    assert np.array_equal(decoded.image, reference.image)  # lossless: the very same pixels
    assert decoded.image.max() > decoded.image.min()


# --- the whole pipeline -------------------------------------------------------------------------

def _encodings(text: str) -> set[bytes]:
    """How a string may be stored: UTF-8, the DICOM's Latin-1, UTF-16 (lower-cased: the search
    ignores case)."""
    return {text.lower().encode(enc) for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be")}


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """A file's bytes, plus the members of zip and gzip files (model archives, compressed logs)."""
    data = path.read_bytes()
    out = [(str(path), data)]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            out += [(f"{path}!{name}", z.read(name)) for name in z.namelist()]
    elif data[:2] == b"\x1f\x8b":
        out.append((f"{path}!gunzip", gzip.decompress(data)))
    return out


def _mlflow_artifact_roots(db: Path) -> set[Path]:
    """Where MLflow stored every run's and logged model's artifacts, as MLflow itself resolves
    them: the search must not rely on them being under the workdir."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    uris = {r.info.artifact_uri for r in client.search_runs(ids, run_view_type=ViewType.ALL)}
    uris |= {m.artifact_location for m in client.search_logged_models(ids)}
    return {Path(local_file_uri_to_path(u)) for u in uris}


def _hits(root: Path, needles: dict[str, set[bytes]]) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = str(path.relative_to(root)).lower()
        hits += [f"{text!r} in the name {rel}" for text in needles if text.lower() in rel]
        for where, data in _contents(path):
            data = data.lower()
            hits += [f"{text!r} in {where}" for text, forms in needles.items()
                     if any(form in data for form in forms)]
    return hits


@pytest.mark.slow
def test_a_pipeline_run_over_dicoms_full_of_phi_writes_none_of_it(tmp_path):
    """DICOMs full of PHI, in folders and files named after the patient, go through `lesionflow
    run`; then every byte under the workdir (dataset, DVC cache and remote, MLflow database and
    artifacts, kfp.local outputs, the run's log) is searched for every PHI string: zero hits.
    The source holds each string (checked first), and the de-identified headers reach the dataset,
    so a missing de-identification or pseudonymization fails here."""
    src, work = tmp_path / "export", tmp_path / "work"
    for p in range(8):
        patient = f"{FILE_NAME}{p}"
        study = uid.generate_uid()
        for k in range(3):
            pixels, lesion = ct_with_lesion(10 * p + k)
            save(phi_dataset(pixels, patient_id=f"{PHI['PatientID']}{p}", study_uid=study),
                 src / "images" / patient / f"{patient}_{k}.dcm")
            (src / "masks" / patient).mkdir(parents=True, exist_ok=True)
            Image.fromarray(lesion.astype(np.uint8) * 255).save(
                src / "masks" / patient / f"{patient}_{k}.png")
    save(phi_dataset(ct_with_lesion(99)[0], BurnedInAnnotation="YES"),
         src / "images" / f"{FILE_NAME}_burned.dcm")
    source_bytes = b"".join(p.read_bytes() for p in src.rglob("*.dcm")).lower()
    source_names = "\n".join(str(p.relative_to(src)) for p in src.rglob("*")).lower()
    needles = {text: _encodings(text) for text in SEARCHED}
    for text, forms in needles.items():  # the test means something only if the source has it all
        assert any(f in source_bytes for f in forms) or text.lower() in source_names, text

    work.mkdir()
    log = work / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, "KUBERNETES_SERVICE_HOST")}
    sets = [*TINY, f"runtime.workdir={work}", f"ingest.source={src}", "ingest.on_error=skip",
            "video.n_rollouts_logged=1"]
    cmd = [sys.executable, "-m", "lesionflow.cli", "run", "--params", str(REPO / "params.yaml")]
    cmd += [arg for s in sets for arg in ("--set", s)]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=900, check=False)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "lesionflow run finished" in text
    assert "BurnedInAnnotationError" in text  # skipped, and said so by pseudonym

    assert list(work.rglob(DICOM_HEADERS)), "the de-identified headers belong to the dataset"
    artifacts = _mlflow_artifact_roots(work / "mlflow.db")
    assert any(p.is_dir() for p in artifacts)
    roots = [work, *sorted(p for p in artifacts if p.is_dir() and not p.is_relative_to(work))]
    hits = [hit for root in roots for hit in _hits(root, needles)]
    assert not hits, "\n".join(hits[:30])
    key = (work / KEY_FILE).read_bytes().strip()  # the secret is not logged anywhere either
    assert _hits(work, {"the key": {key.lower()}}) == [f"'the key' in {work / KEY_FILE}"]
