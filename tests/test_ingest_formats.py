"""Format readers through the real ingest path: DICOM (with de-identification; the profile itself
is tested in test_deid.py), 16-bit TIFF, NIfTI and NRRD volumes, and the mask encodings users
actually have (RGB, palette, RGBA)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from lesionflow.config import IngestConfig
from lesionflow.data import io
from lesionflow.data.deid import Pseudonyms
from lesionflow.data.ingest import DICOM_HEADERS, ingest
from lesionflow.data.io import read_dicom, read_image, read_mask, read_volume
from lesionflow.data.manifest import read_manifest
from lesionflow.errors import MaskSizeMismatchError, UnreadableImageError

PATIENT_ID = "12345"
KEY = b"test-pseudonym-key-0123456789abcdef"
PSEUDONYMS = Pseudonyms(KEY)


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str = PATIENT_ID, **attrs) -> None:
    """A minimal but valid 16-bit CT-like DICOM carrying the usual identifiers (and ``attrs``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "055Y"
    ds.PatientAddress = "1 Doe Street"
    ds.OtherPatientIDs = "MRN-12345"
    ds.InstitutionName = "Doe Memorial Hospital"
    ds.ReferringPhysicianName = "Smith^John"
    ds.AccessionNumber = "A12345"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0011, "ACME Scanner", create=True)
    block.add_new(0x01, "LO", "Doe^Jane 12345")
    ds.save_as(path, enforce_file_format=True)


def ct_pixels(seed: int, shape=(24, 32)) -> np.ndarray:
    """Stored values such that HU = value - 1024 spans far beyond the [-160, 240] window."""
    return np.random.default_rng(seed).integers(0, 2400, shape).astype(np.uint16)


def blob_mask(shape) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = 255
    return m


def test_dicom_is_windowed_and_deidentified(tmp_path):
    path = tmp_path / "x.dcm"
    pixels = ct_pixels(0)
    write_dicom(path, pixels)
    dicom = read_dicom(path, PSEUDONYMS)
    hu = pixels.astype(np.int32) - 1024
    assert dicom.image.dtype == np.uint8 and dicom.image.shape == pixels.shape
    assert (dicom.image[hu <= -160] == 0).all() and (dicom.image[hu >= 240] == 255).all()
    assert dicom.patient == PSEUDONYMS.name(PATIENT_ID) and dicom.spacing is None
    assert np.array_equal(read_image(path), dicom.image)
    header = json.dumps(dicom.header)
    assert "Doe" not in header and PATIENT_ID not in header
    assert dicom.header["00080060"]["Value"] == ["CT"]  # Modality is kept


def test_dicom_ingest_leaks_no_identifier(tmp_path):
    """File names, headers and grouping: only pseudonyms reach the dataset, and the cleaned header
    does (so this fails if the header were not de-identified)."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(2):
        write_dicom(src / "images" / f"Doe_Jane_scan{i}.dcm", ct_pixels(i))
        Image.fromarray(blob_mask((24, 32))).save(src / "masks" / f"Doe_Jane_scan{i}.png")
    write_dicom(src / "images" / "other.dcm", ct_pixels(9), patient_id="99999")
    ingest(IngestConfig(source=str(src)), out, key=KEY)

    by_id = {r.id: r for r in read_manifest(out)}
    scan0, scan1, other = (by_id[PSEUDONYMS.name(s)] for s in ("Doe_Jane_scan0", "Doe_Jane_scan1",
                                                                 "other"))
    assert scan0.group == scan1.group == PSEUDONYMS.name(PATIENT_ID)
    assert other.group == PSEUDONYMS.name("99999")
    assert scan0.kind == "still" and other.kind == "unlabelled" and scan0.split == scan1.split
    assert scan0.source == f"images/{scan0.id}.dcm"
    headers = [json.loads(line) for line in (out / DICOM_HEADERS).read_text().splitlines()]
    assert sorted(h["id"] for h in headers) == sorted(by_id)
    assert all(h["header"]["00100020"]["Value"] == [by_id[h["id"]].group] for h in headers)
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"Doe" not in data and PATIENT_ID.encode() not in data, f


def test_16bit_tiff_is_scaled_to_8bit(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    ramp = np.linspace(1000, 5000, 20 * 30).reshape(20, 30).astype(np.uint16)
    tifffile.imwrite(src / "images" / "ramp.tif", ramp)
    tifffile.imwrite(src / "masks" / "ramp.tiff", (blob_mask((20, 30)) > 0).astype(np.uint16) * 7)
    ingest(IngestConfig(source=str(src)), out)
    (r,) = read_manifest(out)
    image = np.asarray(Image.open(out / r.image))
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert (r.height, r.width, r.channels) == (20, 30, 1)
    assert (np.asarray(Image.open(out / r.mask)) > 0).sum() == (blob_mask((20, 30)) > 0).sum()


def _volumes(shape=(16, 12, 5)) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).normal(100, 30, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:8, 3:6, 1:4] = 1
    return image, mask


@pytest.mark.parametrize("fmt", ["nifti", "nrrd"])
def test_volumes_become_slice_records(tmp_path, fmt):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    image, mask = _volumes()
    if fmt == "nifti":
        nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), src / "images" / "ct.nii.gz")
        nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), src / "masks" / "ct.nii")
    else:
        nrrd.write(str(src / "images" / "ct.nrrd"), image)
        nrrd.write(str(src / "masks" / "ct.nrrd"), mask)
    (volume_file,) = (src / "images").iterdir()
    volume, voxel = read_volume(volume_file)
    assert volume.shape == (16, 12, 5)
    assert voxel == ((1.0, 1.0, 1.0) if fmt == "nifti" else None)  # bare NRRD: no geometry

    ingest(IngestConfig(source=str(src), volume_slice_axis=2), out)
    records = read_manifest(out)
    assert [r.id for r in records] == [f"ct_s{k:03d}" for k in range(5)]
    assert {(r.group, r.height, r.width, r.kind) for r in records} == {("ct", 16, 12, "still")}
    assert {r.spacing for r in records} == {(1.0, 1.0) if fmt == "nifti" else None}
    assert len({r.split for r in records}) == 1
    areas = [int((np.asarray(Image.open(out / r.mask)) > 0).sum()) for r in records]
    assert areas == [0, 12, 12, 12, 0]

    ingest(IngestConfig(source=str(src), volume_slice_axis=0), tmp_path / "out0")
    records = read_manifest(tmp_path / "out0")
    assert len(records) == 16 and (records[0].height, records[0].width) == (12, 5)


def test_dicom_pixel_spacing_reaches_the_record_and_scales_with_it(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    write_dicom(src / "images" / "ct.dcm", ct_pixels(0), PixelSpacing=[0.5, 0.8])
    write_dicom(src / "images" / "xray.dcm", ct_pixels(1), patient_id="2",
                ImagerPixelSpacing=[0.15, 0.15])
    write_dicom(src / "images" / "unknown.dcm", ct_pixels(2), patient_id="3", PixelSpacing=[0, 0])
    Image.fromarray(blob_mask((24, 32))).save(src / "images" / "photo.png")
    assert read_dicom(src / "images" / "ct.dcm", PSEUDONYMS).spacing == (0.5, 0.8)

    ingest(IngestConfig(source=str(src)), tmp_path / "full", key=KEY)
    spacing = {r.id: r.spacing for r in read_manifest(tmp_path / "full")}
    assert spacing == {PSEUDONYMS.name("ct"): (0.5, 0.8), PSEUDONYMS.name("xray"): (0.15, 0.15),
                       PSEUDONYMS.name("unknown"): None, PSEUDONYMS.name("photo"): None}

    # 24x32 → 12x16: every stored pixel covers twice the mm along both axes
    ingest(IngestConfig(source=str(src), max_side=16), tmp_path / "small", key=KEY)
    ct = next(r for r in read_manifest(tmp_path / "small") if r.id == PSEUDONYMS.name("ct"))
    assert (ct.height, ct.width) == (12, 16)
    assert ct.spacing == pytest.approx((1.0, 1.6))


def _slices(out: Path, stem: str, key: str = "image") -> list[np.ndarray]:
    records = sorted((r for r in read_manifest(out) if r.id.startswith(stem)), key=lambda r: r.id)
    return [np.asarray(Image.open(out / getattr(r, key))) for r in records]


def test_nifti_is_sliced_in_canonical_orientation_with_in_plane_spacing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    # one anatomy (x: R, y: A, z: S) stored twice: canonically with voxels 0.9 x 2.5 x 0.7 mm, and
    # as another scanner writes it, axes (S, L, A) with zooms (0.7, 0.9, 2.5)
    canon = np.random.default_rng(0).normal(100, 30, (12, 10, 6)).astype(np.float32)
    canon_mask = np.zeros(canon.shape, np.uint8)
    canon_mask[1:4, 6:9, 2:5] = 1  # off-centre, so a wrong flip or transpose moves it
    stored, stored_mask = (np.transpose(v[::-1], (2, 0, 1)) for v in (canon, canon_mask))
    affine = np.array([[0, -0.9, 0, 11 * 0.9], [0, 0, 2.5, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])
    scanner = nibabel.Nifti1Image(stored, affine)
    assert scanner.header.get_zooms() == pytest.approx((0.7, 0.9, 2.5))
    assert nibabel.aff2axcodes(affine) == ("S", "L", "A")
    nibabel.save(scanner, src / "images" / "scanner.nii.gz")
    nibabel.save(nibabel.Nifti1Image(stored_mask, affine), src / "masks" / "scanner.nii.gz")
    nibabel.save(nibabel.Nifti1Image(canon, np.diag([0.9, 2.5, 0.7, 1])),
                 src / "images" / "canon.nii.gz")
    nibabel.save(nibabel.Nifti1Image(canon_mask, np.diag([0.9, 2.5, 0.7, 1])),
                 src / "masks" / "canon.nii.gz")
    volume, voxel = read_volume(src / "images" / "scanner.nii.gz")
    assert np.array_equal(volume, np.asanyarray(nibabel.as_closest_canonical(scanner).dataobj))
    assert voxel == pytest.approx((0.9, 2.5, 0.7))

    ingest(IngestConfig(source=str(src), volume_slice_axis=2), out)
    records = {r.id: r for r in read_manifest(out)}
    assert [k for k in records if k.startswith("scanner")] == [f"scanner_s{k:03d}" for k in range(6)]
    assert all(r.spacing == pytest.approx((0.9, 2.5)) for r in records.values())
    assert (records["scanner_s000"].height, records["scanner_s000"].width) == (12, 10)
    for key in ("image", "mask"):
        for a, b in zip(_slices(out, "scanner", key), _slices(out, "canon", key), strict=True):
            assert np.array_equal(a, b)

    ingest(IngestConfig(source=str(src), volume_slice_axis=0), tmp_path / "sagittal")
    (first, *_) = (r for r in read_manifest(tmp_path / "sagittal") if r.id.startswith("scanner"))
    assert (first.height, first.width) == (10, 6) and first.spacing == pytest.approx((2.5, 0.7))


def test_nrrd_spacing_and_lps_orientation(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    image, _ = _volumes((40, 12, 5))
    directions = np.diag([0.6, 0.8, 3.0])
    nrrd.write(str(src / "images" / "lps.nrrd"), image,
               {"space": "left-posterior-superior", "space directions": directions})
    nrrd.write(str(src / "images" / "bare.nrrd"), image, {"spacings": [0.6, 0.8, 3.0]})
    volume, voxel = read_volume(src / "images" / "lps.nrrd")
    # stored axes run towards L and P: RAS+ order flips both
    assert np.array_equal(volume, image[::-1, ::-1]) and voxel == pytest.approx((0.6, 0.8, 3.0))
    volume, voxel = read_volume(src / "images" / "bare.nrrd")
    assert np.array_equal(volume, image) and voxel == pytest.approx((0.6, 0.8, 3.0))

    ingest(IngestConfig(source=str(src), volume_slice_axis=2), tmp_path / "out")
    assert all(r.spacing == pytest.approx((0.6, 0.8)) for r in read_manifest(tmp_path / "out"))
    for lps, bare in zip(_slices(tmp_path / "out", "lps"), _slices(tmp_path / "out", "bare"),
                         strict=True):
        assert np.array_equal(lps, bare[::-1, ::-1])
    ingest(IngestConfig(source=str(src), volume_slice_axis=1, max_side=16), tmp_path / "small")
    record = read_manifest(tmp_path / "small")[0]  # 40 x 5 slices shrunk to 16 x 2
    assert (record.height, record.width) == (16, 2)
    assert record.spacing == pytest.approx((0.6 * 40 / 16, 3.0 * 5 / 2))


def test_volume_mask_shape_mismatch_is_named(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    image, mask = _volumes()
    nrrd.write(str(src / "images" / "ct.nrrd"), image)
    nrrd.write(str(src / "masks" / "ct.nrrd"), mask[:, :, :4])
    with pytest.raises(MaskSizeMismatchError, match="ct.nrrd"):
        ingest(IngestConfig(source=str(src)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mask_encodings(tmp_path):
    lesion = blob_mask((10, 12)) > 0
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = lesion * 200  # lesion drawn in green only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pal = Image.fromarray(lesion.astype(np.uint8)).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.save(tmp_path / "pal.png")
    rgba = np.dstack([rgb, np.full((10, 12), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "pal.png", "rgba.png"):
        assert np.array_equal(read_mask(tmp_path / name), lesion), name
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UnreadableImageError, match="junk.jpg"):
        read_mask(tmp_path / "junk.jpg")


def test_a_bug_in_our_code_is_not_reported_as_an_unreadable_file(tmp_path, monkeypatch):
    """Only the decoders' own errors mean "bad file"; anything else propagates as the bug it is."""
    Image.fromarray(blob_mask((10, 12))).save(tmp_path / "ok.png")

    def broken(arr, path):
        raise TypeError("a bug")

    monkeypatch.setattr(io, "_channels_last", broken)
    with pytest.raises(TypeError, match="a bug"):
        read_image(tmp_path / "ok.png")
