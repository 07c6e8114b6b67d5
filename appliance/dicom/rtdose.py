"""DICOM RT Dose writer and reader (a 3D physical dose of a whole plan, in Gy).

Geometry. The dose array is in the project's canonical grid (``core.case``: indices
``[k, j, i]`` increase along +z, +y, +x of the patient LPS system). The file is written in the
orientation of the planning CT (its ImageOrientationPatient, axial only): columns run along the
CT's row direction, rows along its column direction, and frames along the slice normal
``n = row x column``. GridFrameOffsetVector holds the offsets of the frames from the first one
along ``n`` (PS3.3 C.8.8.3.2, relative form: first value 0, then increasing), so frame ``f``
lies at ``ImagePositionPatient + offset[f] * n``. For a head-first CT (n = +z) the frames go
up in z; for a feet-first CT (n = -z) they go down. :func:`read_rtdose` inverts this for any
axial orientation (and also accepts the absolute form whose first offset equals the z of
ImagePositionPatient) and returns the canonical array.

Pixels are 32-bit unsigned integers; ``dose_gy = pixel * DoseGridScaling``. The scaling is
chosen so that the maximum dose uses about 2^31 levels (relative quantisation < 1e-9).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import RTDoseStorage, RTPlanStorage

from appliance.dicom.common import (
    copy_patient_study,
    format_ds,
    format_ds_list,
    read_source,
    save_dataset,
    set_equipment,
    set_image_pixel,
    set_image_plane,
    set_instance_creation,
)
from appliance.dicom.uids import check_written_uid, new_uid
from core.case import Case, Grid
from core.errors import ExportError

logger = logging.getLogger(__name__)

#: Pixel value given to the maximum dose (leaves headroom below 2^32 - 1 after DS rounding).
_LEVELS = float(2**31)
#: Relative tolerance when checking that frames are evenly spaced and axes are axial.
_GEOM_TOL = 1e-3


class DoseUnits(enum.StrEnum):
    """DICOM DoseUnits (3004,0002)."""

    GY = "GY"
    RELATIVE = "RELATIVE"


class DoseType(enum.StrEnum):
    """DICOM DoseType (3004,0004) values this writer uses."""

    PHYSICAL = "PHYSICAL"
    EFFECTIVE = "EFFECTIVE"
    ERROR = "ERROR"


class DoseSummationType(enum.StrEnum):
    """DICOM DoseSummationType (3004,000A) values this writer uses."""

    PLAN = "PLAN"
    FRACTION = "FRACTION"
    BEAM = "BEAM"


def _axial_signs(iop: tuple[float, ...] | list[float], what: str) -> tuple[int, int, int]:
    """Signs (sx, sy, sz) of an axial orientation: row dir = sx*x, column dir = sy*y, normal = sz*z.

    Raises
    ------
    ExportError
        If the orientation is not axial (rows along x, columns along y, up to sign).
    """
    v = np.asarray(iop, dtype=np.float64)
    if v.shape != (6,):
        raise ExportError(f"{what} ImageOrientationPatient must have 6 values, got {list(iop)}")
    row, col = v[:3], v[3:]
    ok = (
        abs(abs(row[0]) - 1) < _GEOM_TOL and np.all(np.abs(row[1:]) < _GEOM_TOL)
        and abs(abs(col[1]) - 1) < _GEOM_TOL and abs(col[0]) < _GEOM_TOL and abs(col[2]) < _GEOM_TOL
    )
    if not ok:
        raise ExportError(
            f"{what} ImageOrientationPatient {list(iop)} is not axial (rows along +/-x, columns along "
            "+/-y); only axial dose grids are supported"
        )
    sx = 1 if row[0] > 0 else -1
    sy = 1 if col[1] > 0 else -1
    return sx, sy, sx * sy


def write_rtdose(
    path: Path,
    *,
    dose_gy: NDArray[np.floating],
    grid: Grid,
    case: Case,
    plan_sop_instance_uid: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> str:
    """Write the plan dose as a DICOM RT Dose and return its SOP Instance UID.

    Parameters
    ----------
    path
        Output file (written atomically; the folder is created).
    dose_gy
        Total plan dose over all fractions, Gy, shape ``grid.shape`` ([z, y, x], canonical
        order), finite and >= 0.
    grid
        Geometry of ``dose_gy`` in patient coordinates (may differ from the CT grid).
    case
        The planned case; ``case.dicom`` names the source CT (patient, study, frame of
        reference are copied from it) and its orientation.
    plan_sop_instance_uid
        SOP Instance UID of the RT Plan this dose belongs to (ReferencedRTPlanSequence).
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones are made when ``None``.

    Returns
    -------
    str
        The RT Dose SOP Instance UID.

    Raises
    ------
    ExportError
        On a shape mismatch, negative or non-finite dose, a non-axial CT orientation, missing
        source files or invalid UIDs.
    """
    refs = case.dicom
    if refs is None:
        raise ExportError(
            f"case {case.case_id} has no DICOM references; an RT Dose needs the source CT"
        )
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != grid.shape:
        raise ExportError(f"dose_gy has shape {dose.shape}, but the dose grid has shape {grid.shape}")
    if not np.all(np.isfinite(dose)):
        raise ExportError(f"dose of case {case.case_id} holds NaN or infinite values")
    if dose.min() < 0:
        raise ExportError(f"dose of case {case.case_id} has negative values (min {dose.min():.3g} Gy)")
    check_written_uid(plan_sop_instance_uid, "referenced RT Plan SOP Instance UID")
    dose_uid = check_written_uid(sop_instance_uid, "dose SOP Instance UID") if sop_instance_uid else new_uid()
    series_uid = check_written_uid(series_instance_uid, "dose Series Instance UID") if series_instance_uid else new_uid()
    sx, sy, sz = _axial_signs(refs.image_orientation, f"case {case.case_id} source CT")
    ct = read_source(refs.source_ct_path, "source CT")

    # Reorder the canonical array into file order: frames along n, rows along col dir, cols along row dir.
    frames = dose[::sz, ::sy, ::sx]
    nz, ny, nx = grid.shape
    x, y, z = grid.axes_mm()
    first = (x[0] if sx > 0 else x[-1], y[0] if sy > 0 else y[-1], z[0] if sz > 0 else z[-1])
    dx, dy, dz = grid.spacing_mm

    dmax = float(dose.max())
    scaling_text = format_ds(dmax / _LEVELS if dmax > 0 else 1.0 / _LEVELS)
    scaling = float(scaling_text)
    pixels = np.clip(np.rint(frames / scaling), 0, 2**32 - 1).astype("<u4")
    now = dt.datetime.now()

    ds = Dataset()
    copy_patient_study(ct, ds)
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = dose_uid
    set_instance_creation(ds, now)
    # RT Series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 901  # a new series; a number keeps DICOMDIR builders and TPS lists happy
    ds.SeriesDescription = "AIRT dose (research output, not clinically approved)"
    ds.OperatorsName = None
    set_equipment(ds)
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    # Image Plane: row spacing (between rows, along y), then column spacing
    set_image_plane(ds, orientation=refs.image_orientation, position_mm=first, pixel_spacing_mm=(dy, dx),
                    slice_thickness_mm=dz)
    # Image Pixel + RT Dose
    set_image_pixel(ds, rows=ny, columns=nx, bits_allocated=32, bits_stored=32)
    # Multi-frame
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.DoseUnits = DoseUnits.GY.value
    ds.DoseType = DoseType.PHYSICAL.value
    ds.DoseComment = "Plan dose, all fractions; research, not clinically approved"
    ds.DoseSummationType = DoseSummationType.PLAN.value
    ref_plan = Dataset()
    ref_plan.ReferencedSOPClassUID = RTPlanStorage
    ref_plan.ReferencedSOPInstanceUID = plan_sop_instance_uid
    ds.ReferencedRTPlanSequence = Sequence([ref_plan])
    ds.GridFrameOffsetVector = format_ds_list(np.arange(nz) * dz)
    ds.DoseGridScaling = scaling_text
    ds.PixelData = pixels.tobytes()

    save_dataset(ds, path)
    logger.info("RT Dose %s for plan %s (case %s): %s voxels, max %.3f Gy",
                dose_uid, plan_sop_instance_uid, case.case_id, grid.shape, dmax)
    return dose_uid


def read_rtdose(path: str | os.PathLike[str]) -> tuple[NDArray[np.float64], Grid]:
    """Read an RT Dose (ours or another system's) into the canonical grid.

    Parameters
    ----------
    path
        An RT Dose file with an axial orientation and evenly spaced frames.

    Returns
    -------
    dose_gy, grid
        Dose in the file's units (Gy for DoseUnits GY), float64, indexed [z, y, x] with indices
        increasing along +x, +y, +z; and its grid.

    Raises
    ------
    ExportError
        If the file is not an RT Dose, is not axial, or its frames are unevenly spaced.
    """
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(f"cannot read RT Dose {os.fspath(path)!r}: {exc}") from exc
    if ds.get("Modality") != "RTDOSE" or "PixelData" not in ds:
        raise ExportError(f"{os.fspath(path)!r} is not an RT Dose with pixel data")
    sx, sy, sz = _axial_signs(list(ds.ImageOrientationPatient), f"RT Dose {os.fspath(path)!r}")
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    dose = pixels * float(ds.get("DoseGridScaling", 1.0) or 1.0)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    if n_frames > 1:
        offsets = np.array([float(v) for v in ds.GridFrameOffsetVector], dtype=np.float64)
        if offsets.shape != (n_frames,):
            raise ExportError(f"RT Dose {os.fspath(path)!r}: GridFrameOffsetVector has {offsets.size} "
                              f"values for {n_frames} frames")
        if offsets[0] != 0.0:  # absolute form (first value = z of ImagePositionPatient)
            offsets = offsets - offsets[0]
        steps = np.diff(offsets)
        dz_signed = float(steps.mean())
        if dz_signed == 0 or np.any(np.abs(steps - dz_signed) > _GEOM_TOL * max(1.0, abs(dz_signed))):
            raise ExportError(f"RT Dose {os.fspath(path)!r}: frames are not evenly spaced ({offsets[:5]}...)")
    else:
        dz_signed = float(ds.get("SliceThickness", 1.0) or 1.0)
    # Frame f lies at ipp_z + offset[f] * sz: its direction along +z is sign(dz_signed * sz).
    tz = 1 if dz_signed * sz > 0 else -1
    canonical = dose[::tz, ::sy, ::sx]
    nz, ny, nx = canonical.shape
    dz = abs(dz_signed)
    origin = (
        ipp[0] if sx > 0 else ipp[0] - (nx - 1) * dx,
        ipp[1] if sy > 0 else ipp[1] - (ny - 1) * dy,
        ipp[2] if tz > 0 else ipp[2] - (nz - 1) * dz,
    )
    grid = Grid(origin_mm=origin, spacing_mm=(dx, dy, dz), shape=(nz, ny, nx))
    return np.ascontiguousarray(canonical), grid
