"""Readers that turn every supported medical/photo format into plain uint8 arrays, with the
pixel spacing in mm where the file states it.

Everything downstream (training, evaluation, serving) only ever sees 8-bit PNGs, so format quirks
— 16-bit TIFFs, DICOM rescale/windowing and compressed transfer syntaxes (JPEG lossless, JPEG-LS,
JPEG 2000 decode through pylibjpeg's plugins), NIfTI/NRRD volumes and their orientation, palette
or RGBA masks — are resolved here, once. DICOM headers are de-identified (``deid``) as soon as
they are read, so no patient identifier travels further than this module; a file that says its
pixels carry burned-in text is refused.

Only what the decoder libraries raise for a bad file becomes ``UnreadableImageError``; any other
exception is a bug here and propagates instead of being reported as a skipped file.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from lesionflow.data.deid import Pseudonyms, deidentify, header_json
from lesionflow.errors import BurnedInAnnotationError, UnreadableImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm")
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd")
LOSSY_EXTS = (".jpg", ".jpeg")

# What each decoder raises for a file it cannot read (PIL reports bad formats as SyntaxError;
# pydicom reports corrupt headers as TypeError too, and missing image attributes as AttributeError,
# which is why its calls sit in the smallest possible try blocks).
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
TIFF_ERRORS = (OSError, ValueError, EOFError)  # tifffile.TiffFileError is a ValueError
DICOM_ERRORS = (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError,
                RuntimeError, struct.error, AttributeError, TypeError)
VOLUME_ERRORS = (OSError, ValueError, EOFError, zlib.error)  # + nibabel's and pynrrd's own, below


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


def _channels_last(arr: np.ndarray, path: Path) -> np.ndarray:
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
        raise UnreadableImageError(f"cannot use {path}: unsupported pixel array shape {arr.shape}")
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
    if ext == ".dcm":
        ds = _open_dicom(path)
        arr = _decode(lambda: ds.pixel_array, path, DICOM_ERRORS)
    elif ext in (".tif", ".tiff"):
        def first_page() -> np.ndarray:
            with tifffile.TiffFile(path) as tif:
                return tif.pages[0].asarray()
        arr = _decode(first_page, path, TIFF_ERRORS)
    else:
        arr = _decode(lambda: _read_pil(path, for_mask), path, PIL_ERRORS)
    return _channels_last(np.asarray(arr), path)


def _decode(read, path: Path, errors: tuple[type[BaseException], ...], what: str = "decode"):
    """``read()``; the decoder's own errors for a bad file become ``UnreadableImageError``."""
    try:
        return read()
    except errors as err:
        raise UnreadableImageError(f"cannot {what} {path}: {type(err).__name__}: {err}") from None


def read_image(path: str | Path) -> np.ndarray:
    """HxW (grayscale) or HxWx3 uint8; deeper bit depths are min-max scaled to 8 bits."""
    path = Path(path)
    if split_ext(path.name)[1] == ".dcm":
        return _dicom_to_uint8(_open_dicom(path), path)
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


@dataclass(frozen=True)
class DicomImage:
    """What ingest keeps of a DICOM file: pixels, and header facts that identify no one."""

    image: np.ndarray  # uint8, windowed
    patient: str | None  # keyed pseudonym of PatientID: groups a patient's files for the splits
    spacing: tuple[float, float] | None  # (row, column) mm
    header: dict  # the de-identified header, DICOM JSON without binary values


def _open_dicom(path: Path) -> Dataset:
    """Read and parse every element now (pydicom parses lazily), so a corrupt header fails here as
    a bad file and not later inside this module's code; refuse burned-in annotations."""
    def parse() -> Dataset:
        ds = pydicom.dcmread(path)
        for _ in ds.iterall():
            pass
        return ds

    ds = _decode(parse, path, DICOM_ERRORS)
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise BurnedInAnnotationError(
            f"{path} says BurnedInAnnotation YES: patient text in the pixels survives any header "
            "clean-up; leave it out of the source, or blank the text and set BurnedInAnnotation NO "
            "(ingest.on_error: skip skips it and lists it in the report)")
    return ds


def _dicom_to_uint8(ds: Dataset, path: Path) -> np.ndarray:
    arr = _decode(lambda: ds.pixel_array, path, DICOM_ERRORS)  # also checks NumberOfFrames
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnreadableImageError(f"cannot use {path}: multi-frame DICOM is not supported; export "
                                   "frames as separate files")
    if getattr(ds, "SamplesPerPixel", 1) != 1:
        return to_uint8(_channels_last(arr, path))  # colour: pixel_array is already RGB
    values = _decode(lambda: apply_modality_lut(arr, ds), path, DICOM_ERRORS)
    if "VOILUTSequence" in ds:
        values = to_uint8(_decode(lambda: apply_voi_lut(values, ds), path, DICOM_ERRORS))
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


def _mm(values, n: int) -> tuple[float, ...] | None:
    """``n`` positive finite sizes, or None: a missing, malformed or zero size means the file does
    not know its geometry (some writers store 0 for "unknown")."""
    try:
        sizes = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return sizes if len(sizes) == n and all(math.isfinite(v) and v > 0 for v in sizes) else None


def _dicom_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) mm: PixelSpacing (in the patient), else ImagerPixelSpacing (at the detector,
    all that many projection radiographs carry)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(keyword) is not None:
            return _mm(ds.get(keyword), 2)
    return None


def read_dicom(path: str | Path, pseudonyms: Pseudonyms) -> DicomImage:
    """Decode a DICOM image; its header is de-identified before anything else reads it, and the
    raw PatientID is used only to derive the keyed pseudonym."""
    path = Path(path)
    ds = _open_dicom(path)
    patient_id = str(ds.get("PatientID", "") or "").strip()
    deidentify(ds, pseudonyms)
    image = _dicom_to_uint8(ds, path)
    return DicomImage(image=image, patient=pseudonyms.name(patient_id) if patient_id else None,
                      spacing=_dicom_spacing(ds), header=header_json(ds))


# NRRD's anatomical spaces (full names and abbreviations) as the signs that turn their axes into
# RAS+; other spaces ("scanner-xyz", "3D-right-handed", ...) say nothing about anatomy
NRRD_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}
MM_PER_UNIT = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "m": 1e3, "meter": 1e3, "um": 1e-3,
               "micron": 1e-3}
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]])  # nibabel orientation: keep the stored axes


@dataclass(frozen=True)
class _Geometry:
    """A volume header reduced to what slicing needs."""

    shape: tuple[int, ...]  # as stored, every axis
    spatial: tuple[int, ...]  # the stored axes that are space; every other axis has size 1
    ornt: np.ndarray  # nibabel orientation from the spatial axes to RAS+ (identity if unknown)
    voxel: tuple[float, ...] | None  # mm per spatial axis, stored order

    def check(self, path: Path) -> None:
        if len(self.spatial) != 3 or any(
                n != 1 for i, n in enumerate(self.shape) if i not in self.spatial):
            raise UnreadableImageError(f"{path} is not a 3-D volume (shape {self.shape})")

    def canonical(self, values: tuple) -> tuple:
        """Per-spatial-axis ``values`` in RAS+ axis order."""
        out = [None] * 3
        for value, (axis, _) in zip(values, self.ornt):
            out[int(axis)] = value
        return tuple(out)


def _to_ras(steps: np.ndarray) -> np.ndarray:
    """nibabel orientation taking voxel axes (``steps``: column j = one step along axis j, in
    RAS+) to the closest RAS+ axes; identity where the steps are degenerate."""
    from nibabel.orientations import io_orientation

    affine = np.eye(4)
    affine[:3, :3] = steps
    ornt = io_orientation(affine)
    return IDENTITY if np.isnan(ornt).any() else ornt


def _nifti_geometry(img) -> _Geometry:
    """The affine (sform, else qform, else pixdim, as nibabel chooses) gives orientation and
    voxel size; an unset unit is read as mm, as ITK and nibabel's tools do."""
    scale = {"meter": 1e3, "micron": 1e-3}.get(img.header.get_xyzt_units()[0], 1.0)
    norms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)) * scale
    shape = tuple(int(n) for n in img.shape)
    return _Geometry(shape, tuple(range(min(3, len(shape)))), _to_ras(img.affine[:3, :3]),
                     _mm(norms, 3))


def _nrrd_geometry(header: dict) -> _Geometry:
    """Space directions give orientation (in RAS+ when ``space`` names an anatomical space) and
    voxel size; bare ``spacings`` give only the size; without either the geometry is unknown."""
    shape = tuple(int(n) for n in header["sizes"])
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=float)
        spatial = tuple(i for i in range(len(shape)) if np.isfinite(directions[i]).all())
        steps = directions[list(spatial)]
        units = header.get("space units") or ["mm"] * steps.shape[1]
        scale = [MM_PER_UNIT.get(u.lower(), math.nan) for u in units]
        # a step's length is only a size when every world axis has the same unit
        lengths = np.sqrt((steps ** 2).sum(axis=1))
        voxel = _mm(lengths * scale[0], 3) if len(set(scale)) == 1 else None
        signs = NRRD_TO_RAS.get(str(header.get("space", "")).lower())
        ornt = IDENTITY if signs is None or steps.shape != (3, 3) else _to_ras((steps * signs).T)
        return _Geometry(shape, spatial, ornt, voxel)
    spatial = tuple(i for i, n in enumerate(shape) if len(shape) == 3 or n != 1)
    spacings = header.get("spacings")
    voxel = None if spacings is None else _mm([spacings[i] for i in spatial], 3)
    return _Geometry(shape, spatial, IDENTITY, voxel)


def _load_volume(path: Path, with_data: bool) -> tuple[_Geometry, np.ndarray | None]:
    what = "decode volume" if with_data else "read volume header of"
    if split_ext(path.name)[1] == ".nrrd":
        import nrrd

        def read():
            return nrrd.read(str(path)) if with_data else (None, nrrd.read_header(str(path)))

        data, header = _decode(read, path, VOLUME_ERRORS + (nrrd.NRRDError,), what)
        geometry = _nrrd_geometry(header)
    else:
        import nibabel
        from nibabel.filebasedimages import ImageFileError
        from nibabel.spatialimages import HeaderDataError

        errors = VOLUME_ERRORS + (ImageFileError, HeaderDataError)
        img = _decode(lambda: nibabel.load(str(path)), path, errors, what)
        geometry = _nifti_geometry(img)
        data = None
        if with_data:
            data = _decode(lambda: np.asanyarray(img.dataobj), path, errors, what)
    geometry.check(path)
    return geometry, data


def volume_shape(path: str | Path) -> tuple[int, int, int]:
    """Shape in RAS+ order from the header alone, so slice ids are known before any voxel is
    decoded."""
    geometry, _ = _load_volume(Path(path), with_data=False)
    return geometry.canonical(tuple(geometry.shape[i] for i in geometry.spatial))


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(3-D array, voxel size in mm per axis or None), unscaled, reoriented to the closest RAS+
    voxel order (``nibabel.as_closest_canonical``; NRRD space directions converted the same
    way), so slices of different scanners come out the same way up. An NRRD without an
    anatomical space keeps its stored order."""
    from nibabel.orientations import apply_orientation

    geometry, data = _load_volume(Path(path), with_data=True)
    data = np.asarray(data)
    data = np.squeeze(data, axis=tuple(i for i in range(data.ndim) if i not in geometry.spatial))
    voxel = None if geometry.voxel is None else geometry.canonical(geometry.voxel)
    return apply_orientation(data, geometry.ornt), voxel
