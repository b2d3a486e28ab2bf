"""Readers that turn every supported medical/photo format into plain uint8 arrays.

Everything downstream (training, evaluation, serving) only ever sees 8-bit PNGs, so format quirks
— 16-bit TIFFs, DICOM rescale/windowing, NIfTI/NRRD volumes, palette or RGBA masks — are resolved
here, once. DICOM headers are de-identified as soon as they are read so no patient identifier can
travel further than this module; the only thing that leaves is a one-way pseudonym.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from lesionflow.errors import UnreadableImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm")
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd")
LOSSY_EXTS = (".jpg", ".jpeg")

# Attributes that identify a patient, a clinician, an institution or an encounter (after DICOM PS3.15
# Annex E, basic profile, restricted to what can appear in the images we read).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "PatientComments",
    "PatientMotherBirthName", "PatientBirthName", "PatientInsurancePlanCodeSequence",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "MedicalRecordLocator",
    "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation", "CountryOfResidence",
    "RegionOfResidence", "AdditionalPatientHistory", "ResponsiblePerson", "PatientWeight",
    "PatientSize", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber", "RequestAttributesSequence",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
)


def split_ext(name: str) -> tuple[str, str]:
    """``("ct", ".nii.gz")`` for ``ct.nii.gz``: the double extension must not leak into ids."""
    lower = name.lower()
    for ext in VOLUME_EXTS + IMAGE_EXTS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot and stem else (name, "")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale anything numeric to 0..255; uint8 passes through untouched."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    a = np.where(finite, a, lo)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """HxW or HxWxC. Planar TIFFs come as CxHxW; an alpha channel is dropped (it carries no
    anatomy, and BUSI-style RGBA masks keep the lesion in RGB with alpha 255 everywhere)."""
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"unsupported pixel array shape {arr.shape}")
    return arr


def _read_pil(path: Path, for_mask: bool) -> np.ndarray:
    """EXIF orientation is deliberately ignored: masks are drawn on the stored pixel grid, so
    rotating only the photo would misalign them. Animated files give their first frame."""
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode == "P" and for_mask:
            return np.asarray(img)  # palette index 0 is background in VOC-style masks
        if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        elif mode == "1":
            img = img.convert("L")
        return np.asarray(img)


def _read_raw(path: Path, for_mask: bool) -> np.ndarray:
    """Pixel values as stored (no scaling), channels last."""
    ext = split_ext(path.name)[1]
    try:
        if ext == ".dcm":
            arr = pydicom.dcmread(path).pixel_array
        elif ext in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                arr = tif.pages[0].asarray()
        else:
            arr = _read_pil(path, for_mask)
        return _channels_last(np.asarray(arr))
    except Exception as err:  # any decoder failure is the same user-facing problem
        raise UnreadableImageError(f"cannot decode {path}: {err}") from None


def read_image(path: str | Path) -> np.ndarray:
    """HxW (grayscale) or HxWx3 uint8; deeper bit depths are min-max scaled to 8 bits."""
    path = Path(path)
    if split_ext(path.name)[1] == ".dcm":
        return read_dicom(path)[0]
    return to_uint8(_read_raw(path, for_mask=False))


def read_mask(path: str | Path) -> np.ndarray:
    """Bool HxW: non-zero in any channel is lesion. JPEG masks are thresholded at half range
    instead, because lossy compression leaves faint non-zero noise around every edge."""
    path = Path(path)
    raw = _read_raw(path, for_mask=True)
    if split_ext(path.name)[1] in LOSSY_EXTS:
        lesion = raw > 127
    else:
        lesion = raw != 0
    return lesion.any(axis=2) if lesion.ndim == 3 else lesion


def pseudonym(patient_id: str) -> str:
    """Stable group id for a patient that does not reveal the patient id."""
    return "p-" + hashlib.sha256(patient_id.encode()).hexdigest()[:12]


def deidentify(ds: Dataset) -> Dataset:
    """Remove identifying attributes and all private tags, in place and in nested sequences."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                deidentify(item)
    for keyword in PHI_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    return ds


def _dicom_to_uint8(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError("multi-frame DICOM is not supported; export frames as separate files")
    if getattr(ds, "SamplesPerPixel", 1) != 1:
        return to_uint8(_channels_last(arr))  # colour: pixel_array is already RGB
    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:
        values = to_uint8(apply_voi_lut(values, ds))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # DICOM linear windowing straight to 0..255, so the window bounds (not the image's own
        # extremes) define black and white, as on a radiology workstation
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = max(float(np.atleast_1d(ds.WindowWidth)[0]), 1.0)
        scaled = ((values - (center - 0.5)) / max(width - 1, 1.0) + 0.5) * 255
        values = np.round(np.clip(scaled, 0, 255)).astype(np.uint8)
    else:
        values = to_uint8(values)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        values = 255 - values  # MONOCHROME1 stores inverted grey levels
    return values


def read_dicom(path: str | Path) -> tuple[np.ndarray, str | None]:
    """(uint8 image, patient pseudonym or None). The header is de-identified before anything
    else sees it; the raw PatientID is used only to derive the pseudonym."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        patient_id = str(ds.get("PatientID", "") or "").strip()
        deidentify(ds)
        image = _dicom_to_uint8(ds)
    except Exception as err:
        raise UnreadableImageError(f"cannot decode DICOM {path}: {err}") from None
    return image, (pseudonym(patient_id) if patient_id else None)


def volume_shape(path: str | Path) -> tuple[int, ...]:
    """Shape from the header alone, so slice ids are known before any voxel is decoded."""
    path = Path(path)
    try:
        if split_ext(path.name)[1] == ".nrrd":
            import nrrd

            shape = tuple(int(s) for s in nrrd.read_header(str(path))["sizes"])
        else:
            import nibabel

            shape = tuple(int(s) for s in nibabel.load(str(path)).shape)
    except Exception as err:
        raise UnreadableImageError(f"cannot read volume header of {path}: {err}") from None
    return _squeeze_shape(shape, path)


def _squeeze_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    if len(squeezed) != 3:
        raise UnreadableImageError(f"{path} is not a 3-D volume (shape {shape})")
    return squeezed


def read_volume(path: str | Path) -> np.ndarray:
    """3-D array in the file's own voxel order (NIfTI and NRRD both give x, y, z), unscaled."""
    path = Path(path)
    try:
        if split_ext(path.name)[1] == ".nrrd":
            import nrrd

            data, _ = nrrd.read(str(path))
        else:
            import nibabel

            data = np.asanyarray(nibabel.load(str(path)).dataobj)
        data = np.asarray(data)
    except Exception as err:
        raise UnreadableImageError(f"cannot decode volume {path}: {err}") from None
    if data.ndim > 3:
        data = data.reshape(_squeeze_shape(data.shape, path))
    _squeeze_shape(data.shape, path)
    return data
