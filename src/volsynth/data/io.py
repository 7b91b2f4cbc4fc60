"""Reading and writing volumes: NIfTI, NRRD, MetaImage and DICOM series, geometry-exact and atomic.

SimpleITK does the format work. What this module adds: one error type that names the file and the problem,
shape/finiteness checks, DICOM series selection, and atomic writes (a reader never sees a half-written file:
outputs are written under a temporary name in the destination folder and renamed into place).
"""

from __future__ import annotations

import contextlib
import gzip
import locale
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volsynth.data.volume import Volume
from volsynth.errors import DataError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class VolumeError(DataError):
    """A volume cannot be used; ``str()`` names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


def image_suffix(path: str | Path) -> str:
    """The image-format suffix of ``path`` (``.nii.gz`` counts as one), or ``""`` if it is not an image file."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_image_suffix(path: str | Path) -> str:
    """File name without its image suffix: ``sub-01_t1.nii.gz`` → ``sub-01_t1``."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


@contextlib.contextmanager
def _keeping_locale() -> Iterator[None]:
    """Put the process locale back after SimpleITK: GDCM (its DICOM I/O) switches it to "C", which silently makes
    ASCII the default text encoding of every later ``open()`` in the process (torch.compile's templates, users'
    own code)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


@_keeping_locale()
def is_dicom_dir(path: str | Path) -> bool:
    """Whether a folder holds a DICOM series (GDCM's "no series found" warning is silenced: it is an answer)."""
    path = Path(path)
    if not path.is_dir():
        return False
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@_keeping_locale()
def read_volume(path: str | Path, *, series_id: str | None = None, check_finite: bool = True) -> Volume:
    """Read a 3D single-channel volume (a file, or a folder holding one DICOM series).

    Raises:
        VolumeError: the file is missing, unreadable or truncated, is not 3D (2D, 4D, vector images), holds
            NaN/Inf (when ``check_finite``), or the DICOM folder holds no or several series (pass ``series_id``).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise VolumeError(path, "empty file (0 bytes)")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, series_id)
        else:
            if not image_suffix(path) and not _looks_like_dicom(path):
                raise VolumeError(path, f"not a supported image file (expected one of {', '.join(IMAGE_SUFFIXES)} "
                                        "or a DICOM series folder)")
            image = sitk.ReadImage(str(path))
    except VolumeError:
        raise
    except RuntimeError as error:
        # ITK reports truncated gzip streams, bad headers and short data as RuntimeError; keep the first line.
        raise VolumeError(path, _unreadable_reason(path, error)) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(path, f"expected a single-channel image, got {image.GetNumberOfComponentsPerPixel()} "
                                "components per voxel (a vector/RGB or 4D image)")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]  # a singleton 4th axis is harmless (some NIfTI writers add one)
    elif dimension != 3:
        raise VolumeError(path, f"expected a 3D volume, got a {dimension}D image of size {image.GetSize()}")
    if min(image.GetSize()) < 2:
        raise VolumeError(path, f"expected a 3D volume, got size {image.GetSize()} (effectively 2D)")
    volume = Volume.from_sitk(image, path=path)
    values = volume.array
    if image_suffix(path) in (".nii", ".nii.gz"):
        # ITK's NIfTI reader silently turns NaN into 0 and pads a truncated gzip stream; nibabel reports both, so
        # NIfTI voxel data is checked once more through it.
        values = _nifti_values(path)
    if check_finite and np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            kinds = [n for n, m in (("NaN", np.isnan(values)), ("Inf", np.isinf(values))) if m.any()]
            raise VolumeError(path, f"contains {' and '.join(kinds)} values ({int(bad.sum())} voxels)")
    return volume


def _unreadable_reason(path: Path, error: Exception) -> str:
    """A reason a person can act on, instead of ITK's internal source-file message."""
    suffix = image_suffix(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(352)
    except OSError as os_error:
        return f"cannot be read ({os_error.strerror})"
    if suffix == ".nii.gz" and not head.startswith(b"\x1f\x8b"):
        return "not a gzip-compressed NIfTI file (the .nii.gz name does not match its content)"
    if suffix in (".nii", ".nii.gz"):
        import gzip
        import zlib

        try:
            header = gzip.decompress(path.read_bytes())[:352] if suffix == ".nii.gz" else head
        except (OSError, EOFError, zlib.error):
            return "truncated or corrupt gzip stream"
        if len(header) < 348 or (int.from_bytes(header[:4], "little") not in (348, 540) and \
                int.from_bytes(header[:4], "big") not in (348, 540)):
            return "not a NIfTI file (no NIfTI header)"
        return "truncated NIfTI file (the voxel data is shorter than its header says)"
    if suffix in (".nrrd", ".nhdr") and not head.startswith(b"NRRD"):
        return "not an NRRD file (no NRRD magic)"
    detail = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = next((line for line in detail if ("rror" in line or "xception" in line) and ".cxx" not in line), "")
    return f"unreadable or truncated image{f' ({reason[:200]})' if reason else ''}"


def _nifti_values(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # EOFError / zlib.error for truncated streams, ValueError for short data
        raise VolumeError(path, f"unreadable or truncated image ({type(error).__name__}: {error})") from None


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom_series(folder: Path, series_id: str | None) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(folder, "folder holds no DICOM series (and is not an image file)")
    if series_id is None:
        if len(series) > 1:
            raise VolumeError(folder, f"folder holds {len(series)} DICOM series ({', '.join(series)}); "
                                      "choose one with series_id")
        series_id = series[0]
    elif series_id not in series:
        raise VolumeError(folder, f"DICOM series {series_id} not found; available: {', '.join(series)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


@_keeping_locale()
def write_volume(volume: Volume, path: str | Path, *, compress: bool = True, description: str | None = None) -> Path:
    """Write ``volume`` to ``path`` atomically; the format follows the suffix (a suffix-less path = DICOM folder).

    Geometry is written exactly (spacing, origin, oblique or flipped direction). Integer and boolean arrays stay
    integer (booleans are written as uint8). MetaImage headers are renamed into place after their data file.
    ``description`` goes into the format's description field (NIfTI ``descrip``, NRRD ``content``, MetaImage
    ``Comment``, DICOM SeriesDescription), e.g. to mark a volume as synthetic.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix:
        return write_dicom_series(volume, path, series_description=description or "volsynth")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        image = volume.to_sitk()
        if description and suffix in (".nii", ".nii.gz"):
            # ITK's NIfTI writer ignores the dictionary's `descrip`: write plain NIfTI, set the 80-byte header field
            # (offset 148 in NIfTI-1) and compress here.
            plain = staging / (path.name[: -len(suffix)] + ".nii")
            sitk.WriteImage(image, str(plain), useCompression=False)
            _set_nifti_description(plain, description)
            if suffix == ".nii.gz":
                with plain.open("rb") as source, gzip.open(staged, "wb", compresslevel=6) as target:
                    shutil.copyfileobj(source, target, 1 << 20)
                plain.unlink()
        else:
            if description:
                image.SetMetaData("content" if suffix in (".nrrd", ".nhdr") else "Comment", description)
            sitk.WriteImage(image, str(staged), useCompression=compress and suffix != ".nii")
        # Data files first, the header (the file users open) last, so a reader never sees a dangling header.
        for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _set_nifti_description(path: Path, description: str) -> None:
    encoded = description.encode("ascii", "replace")[:79]
    with path.open("r+b") as handle:
        handle.seek(148)
        handle.write(encoded.ljust(80, b"\0"))


def read_description(path: str | Path) -> str:
    """The description field written by :func:`write_volume` (NIfTI ``descrip``; others via ITK metadata)."""
    path = Path(path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        import nibabel as nib

        return bytes(nib.load(str(path)).header["descrip"]).decode("ascii", "replace").rstrip("\0")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    for key in ("content", "Comment", "0008|103e"):
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key)
    return ""


@_keeping_locale()
def write_dicom_series(volume: Volume, folder: str | Path, *, modality: str = "OT",
                       series_description: str = "volsynth") -> Path:
    """Write a DICOM series (one file per z slice) into ``folder``, replacing it atomically.

    Float data is stored as int16 with a RescaleSlope so a reader recovers real values to within half a
    quantisation step (1/64000 of the largest magnitude); integral data (HU) is stored exactly. Geometry uses
    ImageOrientationPatient/ImagePositionPatient per slice, so oblique directions survive.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    pixel_tags: dict[str, str] = {}
    if np.issubdtype(array.dtype, np.floating):
        if np.allclose(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
            array = np.round(array).astype(np.int16)  # integral floats (HU) need no rescaling
        else:
            # GDCM quantises float input itself given a slope (it insists on an integral intercept): signed
            # 16-bit with the slope chosen so the largest magnitude uses the full range.
            array = array.astype(np.float64)
            slope = max(float(np.abs(array).max()), 1e-12) / 32000.0
            pixel_tags = {"0028|1053": f"{slope:.10g}", "0028|1052": "0", "0028|0100": "16", "0028|0101": "16",
                          "0028|0102": "15", "0028|0103": "1"}
    elif array.dtype not in (np.uint8, np.int16, np.uint16):
        if array.min() >= -32768 and array.max() <= 32767:
            array = array.astype(np.int16)
        else:
            raise VolumeError(folder, f"integer range {array.min()}..{array.max()} does not fit 16-bit DICOM")
    image = Volume(array, volume.spacing, volume.origin, volume.direction).to_sitk()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        study_uid = f"2.25.{uuid.uuid4().int}"
        series_uid = f"2.25.{uuid.uuid4().int}"
        frame_uid = f"2.25.{uuid.uuid4().int}"
        row, col = volume.direction[:, 0], volume.direction[:, 1]
        orientation = "\\".join(f"{v:.10g}" for v in (*row, *col))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            slice_image = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": modality, "0008|103e": series_description, "0020|000d": study_uid,
                "0020|000e": series_uid, "0020|0052": frame_uid, "0020|0013": str(k + 1),
                "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.10g}" for v in position),
                "0018|0050": f"{volume.spacing[2]:.10g}", "0008|0008": "DERIVED\\SECONDARY",
                "0008|0018": f"{series_uid}.{k + 1}", "0010|0010": "volsynth", "0010|0020": "volsynth",
            }
            for key, value in (tags | pixel_tags).items():
                slice_image.SetMetaData(key, value)
            writer.SetFileName(str(staging / f"slice_{k:05d}.dcm"))
            writer.Execute(slice_image)
        if folder.exists():
            backup = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, backup)
            os.replace(staging, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
