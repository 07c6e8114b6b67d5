"""Helpers shared by the DICOM writers and readers of the appliance (RT Plan, RT Dose, CT, RT Structure Set).

- :func:`format_ds` turns a number into a Decimal String of at most 16 characters (Eclipse
  rejects longer ones) with as many significant digits as fit: pydicom's format_number_as_ds
  and three rules of ours.
- :func:`copy_patient_study` copies the Patient, Patient Study, General Study and Frame of
  Reference attributes from a source dataset (the planning CT): never retyped.
- :func:`length_violations` walks a dataset (sequences included) and lists every value longer
  than its VR allows; writers call it just before saving, tests call it on what was saved.
- :func:`save_dataset` writes a dataset atomically (temporary name, fsync, rename).

UIDs are made and checked in :mod:`appliance.dicom.uids`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from core.errors import ExportError

logger = logging.getLogger(__name__)

#: Longest value, in characters, of the string VRs this package writes (PS3.5 table 6.2-1).
MAX_VALUE_LENGTH: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "SH": 16,
    "UI": 64,
}

MANUFACTURER = "AIRT planning appliance (research use only)"
MODEL_NAME = "airt-appliance"
RESEARCH_NOTE = "Research output, not clinically approved"

#: The largest magnitude format_number_as_ds writes without rounding it up to infinity (10 significant
#: digits at a three-digit exponent).
_LARGEST_DS = 1.797693134e308

# Attributes copied verbatim from the source CT when present. The second element says whether
# the attribute is Type 2 in the target IODs (written empty when the source lacks it).
_PATIENT_STUDY_FOR: tuple[tuple[str, bool], ...] = (
    # Patient module
    ("PatientName", True),
    ("PatientID", True),
    ("IssuerOfPatientID", False),
    ("PatientBirthDate", True),
    ("PatientSex", True),
    ("OtherPatientIDsSequence", False),
    ("PatientIdentityRemoved", False),
    ("DeidentificationMethod", False),
    ("DeidentificationMethodCodeSequence", False),
    # Patient Study module
    ("PatientAge", False),
    ("PatientSize", False),
    ("PatientWeight", False),
    # General Study module
    ("StudyInstanceUID", True),
    ("StudyDate", True),
    ("StudyTime", True),
    ("ReferringPhysicianName", True),
    ("StudyID", True),
    ("AccessionNumber", True),
    ("StudyDescription", False),
    ("IssuerOfAccessionNumberSequence", False),
    # Frame of Reference module
    ("FrameOfReferenceUID", True),
    ("PositionReferenceIndicator", True),
)


@dataclass(frozen=True)
class DicomFile:
    """One DICOM file read without its pixel data (the readers' unit: a CT slice, a structure set)."""

    path: Path
    ds: Dataset

    @property
    def sop_uid(self) -> str:
        """SOPInstanceUID of the file ("" when absent)."""
        return str(self.ds.get("SOPInstanceUID", ""))


def format_ds(value: float) -> str:
    """Format a number as a DICOM Decimal String of at most 16 characters.

    pydicom's :func:`~pydicom.valuerep.format_number_as_ds` does the formatting: the shortest
    string that reads back to ``value`` exactly when it fits in 16 characters, else ``value``
    rounded to the most significant digits that fit (at least 10 for magnitudes in
    [1e-99, 1e99], 8 with a three-digit exponent). This wrapper adds three rules of ours that it
    lacks:

    - any real number is accepted (ints and numpy scalars too), and NaN or infinity raise the
      project's :class:`~core.errors.ExportError` naming the value;
    - where rounding carries into one more digit, pydicom's string has 17 characters
      (``9.999999999999998`` gives ``'10.00000000000000'``), which Eclipse rejects: the rounded
      number is formatted again (``'10.0'``);
    - magnitudes above 1.797693134e308, which pydicom rounds up to a string that reads back as
      infinity, are written as 1.797693134e308 (0.0000000007 % smaller).

    Raises
    ------
    ExportError
        If ``value`` is NaN or infinite (a DS cannot hold them).
    """
    v = float(value)
    if not math.isfinite(v):
        raise ExportError(f"cannot write {value!r} as a DICOM DS value: it must be a finite number")
    if abs(v) > _LARGEST_DS:
        v = math.copysign(_LARGEST_DS, v)
    text = format_number_as_ds(v)
    if len(text) > 16:
        text = format_number_as_ds(float(text))
    return text


def format_ds_list(values: Iterable[float]) -> list[str]:
    """:func:`format_ds` applied to every value (for multi-valued DS attributes)."""
    return [format_ds(v) for v in values]


def software_version() -> str:
    """Version of the installed package (``SoftwareVersions``), or ``"unknown"`` outside an install."""
    try:
        return metadata.version("airt-appliance")
    except metadata.PackageNotFoundError:
        return "unknown"


def read_source(path: str | os.PathLike[str], what: str) -> Dataset:
    """Read a source DICOM file without pixel data.

    Raises
    ------
    ExportError
        If the file is missing or is not DICOM; the message names ``what`` and the path.
    """
    try:
        return pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(
            f"cannot read the {what} {os.fspath(path)!r} needed to write the output: {exc}; "
            "the source files of the job must stay in place until export"
        ) from exc


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy Patient, Patient Study, General Study and Frame of Reference attributes.

    Values are copied element by element (never retyped); Type 2 attributes that the source
    lacks are written empty. ``SpecificCharacterSet`` is copied so that names keep their
    encoding.

    Raises
    ------
    ExportError
        If the source has no StudyInstanceUID or FrameOfReferenceUID.
    """
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if not source.get(keyword):
            raise ExportError(
                f"the source CT {source.get('SOPInstanceUID', '?')} has no {keyword}; "
                "outputs cannot be linked to the study without it"
            )
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword, type2 in _PATIENT_STUDY_FOR:
        if keyword in source:
            elem = source[keyword]
            target[elem.tag] = pydicom.DataElement(elem.tag, elem.VR, _copy_value(elem.value))
        elif type2:
            setattr(target, keyword, None if keyword.endswith("Sequence") else "")


def _copy_value(value: object) -> object:
    """A deep copy of sequences (so later edits of the target never touch the source)."""
    if isinstance(value, pydicom.Sequence):
        return pydicom.Sequence([_copy_dataset(item) for item in value])
    return value


def _copy_dataset(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        out[elem.tag] = pydicom.DataElement(elem.tag, elem.VR, _copy_value(elem.value))
    return out


def set_equipment(ds: Dataset) -> None:
    """Fill the General Equipment module with this project's identity."""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = software_version()


def set_instance_creation(ds: Dataset, now: dt.datetime) -> None:
    """InstanceCreationDate/Time (SOP Common) from ``now`` (local time of the appliance)."""
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")


def set_image_plane(
    ds: Dataset,
    *,
    orientation: Iterable[float],
    position_mm: Iterable[float],
    pixel_spacing_mm: tuple[float, float],
    slice_thickness_mm: float,
) -> None:
    """Fill the Image Plane module: ImageOrientationPatient (row then column direction cosines),
    ImagePositionPatient of the first stored pixel (mm), PixelSpacing (between rows, between
    columns; mm) and SliceThickness (mm), as DS values of at most 16 characters."""
    ds.ImageOrientationPatient = format_ds_list(orientation)
    ds.ImagePositionPatient = format_ds_list(position_mm)
    ds.PixelSpacing = format_ds_list(pixel_spacing_mm)
    ds.SliceThickness = format_ds(slice_thickness_mm)


def set_image_pixel(ds: Dataset, *, rows: int, columns: int, bits_allocated: int, bits_stored: int) -> None:
    """Fill the Image Pixel module of an unsigned greyscale image (MONOCHROME2, one sample per
    pixel, the high bit just below ``bits_stored``); the caller sets PixelData."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def length_violations(ds: Dataset) -> list[str]:
    """Every value longer than its VR allows, walking sequences; ``[]`` when all fit.

    Checks the VRs of :data:`MAX_VALUE_LENGTH`. DS and IS values are measured as they are
    (or will be) encoded: the original string when the value came from a string or a file.
    """
    problems: list[str] = []
    for elem in ds.iterall():
        limit = MAX_VALUE_LENGTH.get(elem.VR)
        if limit is None or elem.value is None or elem.VM == 0:
            continue
        values: Sequence[object] = elem.value if elem.VM > 1 else [elem.value]
        for v in values:
            text = getattr(v, "original_string", None)
            if text is None:
                text = str(v)
            if len(text) > limit:
                problems.append(
                    f"{elem.keyword or elem.tag} ({elem.VR}) value {text!r} has {len(text)} characters, "
                    f"at most {limit} allowed"
                )
    return problems


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file (Explicit VR Little Endian) atomically.

    The file is written under a temporary name in the same folder, fsynced, then renamed, so a
    reader never sees a partial file.

    Raises
    ------
    ExportError
        If a value is too long for its VR or the file cannot be written.
    """
    problems = length_violations(ds)
    if problems:
        raise ExportError(
            f"refusing to write {path}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {exc}; check the output folder and free disk space") from exc
    logger.debug("wrote %s %s to %s", ds.Modality, ds.SOPInstanceUID, path)
