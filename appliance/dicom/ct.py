"""The planning CT series: its geometry checked and mapped onto the canonical grid of
:mod:`core.case` (indices increasing along +x, +y, +z of the DICOM patient coordinate system),
its volume in Hounsfield units, and its patient position.

Only an untilted axial series on a regular grid is plannable; everything else is refused with an
:class:`~core.errors.InputError` naming the series or slice and saying what to do: missing image
geometry, a single slice, gantry tilt, slices that disagree on rows, columns, pixel spacing or
orientation, a non-axial orientation, two slices at one position, missing slices, uneven slice
spacing, in-plane shifts between slices, or an unsupported PatientPosition. Pixels are decoded by
:mod:`appliance.dicom.ct_pixels`.

:func:`ct_slice_dataset` writes one axial slice (the synthetic cases of
:mod:`appliance.synth_dicom`); the tests read such slices back through :func:`ct_geometry` and
:func:`read_ct_volume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from appliance.dicom.common import DicomFile, format_ds, set_image_pixel, set_image_plane
from appliance.dicom.ct_pixels import read_slice_hu
from core.case import Grid, PatientPosition
from core.errors import InputError

#: Largest deviation of a direction cosine from an axis for an orientation to count as axial.
AXIAL_COSINE_TOLERANCE = 1e-3
#: Largest |GantryDetectorTilt| accepted as "no tilt", degrees.
TILT_TOLERANCE_DEG = 1e-3
#: A gap between neighbouring slices larger than this times the median spacing is a missing slice.
MISSING_SLICE_FACTOR = 1.5
#: Relative deviation of one slice spacing from the median above which the spacing is uneven.
UNEVEN_SPACING_REL = 0.02
#: Absolute deviation (mm) below which a spacing difference is rounding noise.
UNEVEN_SPACING_ABS_MM = 0.01
#: In-plane shift of ImagePositionPatient between slices (in pixels) that reveals a tilted series.
IN_PLANE_SHIFT_TOLERANCE_PX = 0.1


@dataclass(frozen=True)
class CtGeometry:
    """How the stored CT slices map onto the canonical grid."""

    slices: tuple[DicomFile, ...]  # sorted by increasing z
    grid: Grid
    transpose: bool  # stored columns run along y (rows along x)
    flip_x: bool  # after the optional transpose, reverse the x (last) axis
    flip_y: bool  # after the optional transpose, reverse the y (first) axis
    iop: tuple[float, float, float, float, float, float]



def _floats(value: object, n: int, what: str, inst: DicomFile) -> NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) has an unreadable {what}: {exc}; the file is not "
            "valid CT DICOM"
        ) from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) has {what} {list(arr)}, expected {n} finite "
            "numbers; the file is not valid CT DICOM"
        )
    return arr


def _axis_of(cosines: NDArray[np.float64]) -> tuple[int, float] | None:
    """(axis, sign) when a direction cosine vector lies along a patient axis, else None."""
    axis = int(np.argmax(np.abs(cosines)))
    if abs(abs(cosines[axis]) - 1.0) > AXIAL_COSINE_TOLERANCE:
        return None
    others = np.delete(cosines, axis)
    if np.any(np.abs(others) > AXIAL_COSINE_TOLERANCE):
        return None
    return axis, float(np.sign(cosines[axis]))


def ct_geometry(series_uid: str, instances: list[DicomFile]) -> CtGeometry:
    """Check a CT series for plannable geometry and describe its canonical grid."""
    required = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for inst in instances:
        missing = [kw for kw in required if inst.ds.get(kw) in (None, "")]
        if missing:
            raise InputError(
                f"CT slice {inst.sop_uid} ({inst.path.name}) of series {series_uid} lacks {missing}; "
                "the planner needs full image geometry: export the CT again"
            )
    if len(instances) < 2:
        inst = instances[0]
        raise InputError(
            f"CT series {series_uid} has only 1 slice ({inst.path.name}); planning needs a CT volume: send "
            "the whole series"
        )
    ref = instances[0]
    rows, cols = int(ref.ds.Rows), int(ref.ds.Columns)
    spacing = _floats(ref.ds.PixelSpacing, 2, "PixelSpacing", ref)
    iop = _floats(ref.ds.ImageOrientationPatient, 6, "ImageOrientationPatient", ref)
    if np.any(spacing <= 0):
        raise InputError(f"CT series {series_uid} has PixelSpacing {list(spacing)} mm; it must be > 0")
    for inst in instances:
        ds = inst.ds
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > TILT_TOLERANCE_DEG:
            raise InputError(
                f"CT series {series_uid} was acquired with gantry tilt {tilt} deg (slice {inst.sop_uid}); "
                "only untilted axial CTs can be planned: rescan without tilt or resample to axial"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise InputError(
                f"CT series {series_uid} has slices of different sizes: {rows}x{cols} and "
                f"{int(ds.Rows)}x{int(ds.Columns)} (slice {inst.sop_uid}); send one consistent series"
            )
        sp = _floats(ds.PixelSpacing, 2, "PixelSpacing", inst)
        if np.any(np.abs(sp - spacing) > 1e-4):
            raise InputError(
                f"CT series {series_uid} has inconsistent pixel spacing: {list(spacing)} mm and "
                f"{list(sp)} mm (slice {inst.sop_uid}); send one consistent series"
            )
        o = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", inst)
        if np.any(np.abs(o - iop) > 1e-4):
            raise InputError(
                f"CT series {series_uid} has inconsistent ImageOrientationPatient: {list(iop)} and {list(o)} "
                f"(slice {inst.sop_uid}); send one consistent series"
            )
    row_cos, col_cos = iop[:3], iop[3:]
    ra, ca = _axis_of(row_cos), _axis_of(col_cos)
    if ra is None or ca is None or ra[0] == 2 or ca[0] == 2 or ra[0] == ca[0]:
        raise InputError(
            f"CT series {series_uid} has a non-axial ImageOrientationPatient {list(iop)} (oblique, tilted, "
            "sagittal or coronal); only axial CTs can be planned: send an axial, untilted series"
        )
    normal = np.cross(row_cos, col_cos)
    ipps = np.stack([_floats(i.ds.ImagePositionPatient, 3, "ImagePositionPatient", i) for i in instances])
    along = ipps @ normal
    order = np.argsort(along, kind="stable")
    sorted_inst = [instances[i] for i in order]
    along = along[order]
    ipps = ipps[order]
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        a, b = sorted_inst[dup[0]], sorted_inst[dup[0] + 1]
        raise InputError(
            f"CT series {series_uid} has two slices at the same position {along[dup[0]]:.3f} mm "
            f"({a.sop_uid} and {b.sop_uid}); the series mixes acquisitions: send one reconstruction"
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > MISSING_SLICE_FACTOR * median)
    if gaps.size:
        g = gaps[0]
        raise InputError(
            f"CT series {series_uid} is missing slices: a gap of {steps[g]:.3f} mm between positions "
            f"{along[g]:.3f} and {along[g + 1]:.3f} mm where the median spacing is {median:.3f} mm "
            f"({gaps.size} gap(s)); send the complete series"
        )
    tol = max(UNEVEN_SPACING_ABS_MM, UNEVEN_SPACING_REL * median)
    spacing_z = float((along[-1] - along[0]) / (along.size - 1))
    drift = np.abs(along - (along[0] + spacing_z * np.arange(along.size)))
    if np.any(np.abs(steps - median) > tol) or np.any(drift > 0.1 * spacing_z):
        raise InputError(
            f"CT series {series_uid} has uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm, "
            f"median {median:.3f} mm); the planner needs a regular grid: reconstruct with constant spacing"
        )
    # An untilted series keeps the same in-plane position on every slice; a shift reveals tilt.
    in_plane = np.stack([ipps @ row_cos / spacing[1], ipps @ col_cos / spacing[0]], axis=1)
    shift = np.abs(in_plane - in_plane[0]).max()
    if shift > IN_PLANE_SHIFT_TOLERANCE_PX:
        raise InputError(
            f"CT series {series_uid}: ImagePositionPatient moves in-plane by {shift:.2f} pixels across "
            "slices (a tilted or sheared acquisition); only untilted axial CTs can be planned"
        )
    # Canonical grid. Stored pixel [r, c] lies at IPP + c*spacing[1]*row_cos + r*spacing[0]*col_cos.
    transpose = ra[0] == 1  # columns run along y, rows along x
    if transpose:
        dx, dy = float(spacing[0]), float(spacing[1])
        nx, ny = rows, cols
        sx, sy = ca[1], ra[1]
    else:
        dx, dy = float(spacing[1]), float(spacing[0])
        nx, ny = cols, rows
        sx, sy = ra[1], ca[1]
    # z order: slices sorted along the normal, which is +z or -z.
    z_sign = float(np.sign(normal[2]))
    if z_sign < 0:
        sorted_inst.reverse()
        ipps = ipps[::-1]
    first_ipp = ipps[0]
    ox = float(first_ipp[0] + min(0.0, sx * (nx - 1) * dx))
    oy = float(first_ipp[1] + min(0.0, sy * (ny - 1) * dy))
    oz = float(first_ipp[2])
    grid = Grid(
        origin_mm=(ox, oy, oz),
        spacing_mm=(dx, dy, abs(spacing_z)),
        shape=(len(sorted_inst), ny, nx),
    )
    iop_t = tuple(float(v) for v in iop)
    return CtGeometry(
        slices=tuple(sorted_inst),
        grid=grid,
        transpose=transpose,
        flip_x=sx < 0,
        flip_y=sy < 0,
        iop=(iop_t[0], iop_t[1], iop_t[2], iop_t[3], iop_t[4], iop_t[5]),
    )


def read_ct_volume(geometry: CtGeometry) -> NDArray[np.float32]:
    """The CT in HU on the canonical grid ([z, y, x], indices increasing along +x, +y, +z)."""
    nz, ny, nx = geometry.grid.shape
    rows, cols = (nx, ny) if geometry.transpose else (ny, nx)
    volume = np.empty((nz, ny, nx), dtype=np.float32)
    for k, inst in enumerate(geometry.slices):
        sl = read_slice_hu(inst, rows, cols)
        if geometry.transpose:
            sl = sl.T
        if geometry.flip_y:
            sl = sl[::-1, :]
        if geometry.flip_x:
            sl = sl[:, ::-1]
        volume[k] = sl
    return volume


def patient_position(geometry: CtGeometry) -> PatientPosition:
    """The series' PatientPosition (one value on every slice, one the planner supports); raises InputError."""
    values = {str(i.ds.get("PatientPosition", "") or "").strip().upper() for i in geometry.slices}
    series = str(geometry.slices[0].ds.get("SeriesInstanceUID", ""))
    if len(values) > 1:
        raise InputError(
            f"CT series {series} has slices with different PatientPosition values {sorted(values)}; "
            "send one consistent series"
        )
    value = values.pop()
    allowed = [p.value for p in PatientPosition]
    if value not in allowed:
        raise InputError(
            f"CT series {series} has PatientPosition {value or '(empty)'}; the planner supports {allowed}: "
            "scan the patient in one of these positions and set PatientPosition"
        )
    return PatientPosition(value)


def ct_slice_dataset(
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    instance_number: int,
    patient_position: PatientPosition,
    orientation: tuple[float, float, float, float, float, float],
    position_mm: tuple[float, float, float],
    pixel_mm: float,
    slice_mm: float,
    stored: NDArray[np.uint16],
    bits_stored: int,
    rescale_intercept: float,
) -> Dataset:
    """One axial CT Image Storage slice: SOP Common UIDs, the General Series, General Image, Image
    Plane, Image Pixel and CT Image attributes and the pixels.

    Parameters
    ----------
    sop_instance_uid, series_instance_uid
        UIDs of the slice and of its series.
    instance_number
        InstanceNumber (1-based).
    patient_position
        PatientPosition of the series.
    orientation
        ImageOrientationPatient (row, then column direction cosines) of an axial slice.
    position_mm
        ImagePositionPatient: patient coordinates (LPS) of the first stored pixel's centre, mm;
        its z is also written as SliceLocation.
    pixel_mm
        Square pixel size, mm (> 0).
    slice_mm
        SliceThickness, mm (> 0).
    stored
        Stored values, ``[row, column]`` in stored order, unsigned, below ``2**bits_stored``.
    bits_stored
        BitsStored (1-16; 16 bits allocated).
    rescale_intercept
        RescaleIntercept: HU = stored value + intercept (slope 1).

    Returns
    -------
    pydicom.dataset.Dataset
        The slice without the Patient, General Study, Frame of Reference and General Equipment
        modules, which the caller adds.
    """
    rows, columns = stored.shape
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.PatientPosition = patient_position.value
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    set_image_plane(ds, orientation=orientation, position_mm=position_mm, pixel_spacing_mm=(pixel_mm, pixel_mm),
                    slice_thickness_mm=slice_mm)
    ds.SliceLocation = format_ds(position_mm[2])
    set_image_pixel(ds, rows=rows, columns=columns, bits_allocated=16, bits_stored=bits_stored)
    ds.RescaleIntercept = format_ds(rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds
