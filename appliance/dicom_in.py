"""DICOM input: a folder holding a CT series and an RT Structure Set becomes a planning :class:`Case`.

The loader reads every file under a folder (recursively), picks the CT series that the RT
Structure Set refers to, builds the CT volume in Hounsfield units on the canonical grid of
:mod:`core.case` (indices increasing along +x, +y, +z of the DICOM patient coordinate
system), and rasterises the closed planar contours of every ROI whose name maps to a planning
role onto that grid.

Everything the planner cannot trust is refused with an :class:`~core.errors.InputError`
whose message says what was wrong, with which UID, ROI or file, and what to do: a folder with
no CT or no RT Structure Set, several CT series with no way to choose, missing slices, uneven
slice spacing, gantry tilt or a non-axial orientation, slices that disagree on rows, columns or
pixel spacing, pixel data of the wrong size, an RT Structure Set in another frame of reference,
no PTV, or an empty PTV.

pydicom is used directly rather than highdicom's volume support: the loader needs the exact
refusals above (with the project's messages) and the one canonical flip of
:mod:`core.case`, and ``ContourData`` is parsed from the raw element bytes, which is 20x
faster than pydicom's per-value ``DSfloat`` conversion on large structure sets.

Patient names are never read into messages or logs; UIDs and file names are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from appliance.config import StructureSettings
from appliance.dicom.common import lossy_reason
from core.case import Case, DicomRefs, Grid, PatientPosition, Prescription, Role
from core.errors import InputError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

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
#: Largest fraction of PTV voxels outside the BODY contour (skin-flash margins) before the case is refused.
PTV_OUTSIDE_BODY_MAX_FRACTION = 0.10
#: In-plane shift of ImagePositionPatient between slices (in pixels) that reveals a tilted series.
IN_PLANE_SHIFT_TOLERANCE_PX = 0.1

_UNCOMPRESSED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)


@dataclass(frozen=True)
class _Instance:
    """One DICOM file read without its pixel data."""

    path: Path
    ds: Dataset

    @property
    def sop_uid(self) -> str:
        return str(self.ds.get("SOPInstanceUID", ""))


@dataclass(frozen=True)
class _CtGeometry:
    """How the stored CT slices map onto the canonical grid."""

    slices: tuple[_Instance, ...]  # sorted by increasing z
    grid: Grid
    transpose: bool  # stored columns run along y (rows along x)
    flip_x: bool  # after the optional transpose, reverse the x (last) axis
    flip_y: bool  # after the optional transpose, reverse the y (first) axis
    iop: tuple[float, float, float, float, float, float]


# ---------------------------------------------------------------------------------------------
# Public API


def load_case(
    folder: Path,
    *,
    structures: StructureSettings,
    prescription: Prescription,
    case_id: str | None = None,
) -> Case:
    """Build a planning case from a folder of DICOM files (a CT series and an RT Structure Set).

    Parameters
    ----------
    folder
        Folder searched recursively; files that are not DICOM are ignored (debug log).
    structures
        ROI name -> role mapping (``[structures]`` of the configuration). Only ROIs that map to a
        role are rasterised; several ROIs of one role: the largest (in voxels) is kept.
    prescription
        Dose prescribed to the PTV, copied into the case.
    case_id
        Identifier of the case (sanitised for file names); default: the sanitised
        StudyInstanceUID of the CT.

    Returns
    -------
    Case
        CT in HU (float32, ``[z, y, x]``, canonical LPS-increasing grid), boolean masks by role,
        the original ROI names, patient position, prescription and the source UIDs.

    Raises
    ------
    InputError
        When the folder cannot be planned as it is; the message names the file, UID or ROI and
        says what to do.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"case folder {folder} does not exist or is not a folder; pass a folder of DICOM files"
        )
    cts, rtstructs = _scan_folder(folder)
    if not cts:
        raise InputError(
            f"no CT image (CT Image Storage, single-frame) found under {folder}; "
            "send the planning CT series together with the RT Structure Set"
        )
    if not rtstructs:
        raise InputError(
            f"no RT Structure Set found under {folder} (CT series: {sorted(cts)}); "
            "send the RT Structure Set that contours the planning CT"
        )
    rtstruct = _choose_rtstruct(rtstructs, cts)
    series_uid = _choose_ct_series(cts, rtstruct)
    _check_referenced_images(rtstruct, series_uid, cts[series_uid])
    geometry = _ct_geometry(series_uid, cts[series_uid])
    ct_hu = _read_ct_volume(geometry)
    ct_for = str(geometry.slices[0].ds.FrameOfReferenceUID)
    masks, names = _structure_masks(rtstruct, ct_for, geometry, structures)

    first = geometry.slices[0].ds
    study_uid = str(first.get("StudyInstanceUID", ""))
    if not study_uid:
        raise InputError(f"CT series {series_uid} has no StudyInstanceUID; the CT files are not valid DICOM")
    rs_study = str(rtstruct.ds.get("StudyInstanceUID", ""))
    if rs_study and rs_study != study_uid:
        logger.warning(
            "RT Structure Set %s belongs to study %s, the CT to study %s; using the CT's study",
            rtstruct.sop_uid, rs_study, study_uid,
        )
    refs = DicomRefs(
        study_instance_uid=study_uid,
        frame_of_reference_uid=ct_for,
        ct_series_instance_uid=series_uid,
        rtstruct_sop_instance_uid=rtstruct.sop_uid,
        source_ct_path=str(geometry.slices[0].path),
        rtstruct_path=str(rtstruct.path),
        image_orientation=geometry.iop,
    )
    cid = sanitise_case_id(case_id if case_id is not None else study_uid)
    case = Case(
        case_id=cid,
        ct_hu=ct_hu,
        grid=geometry.grid,
        masks=masks,
        structure_names=names,
        patient_position=_patient_position(geometry),
        prescription=prescription,
        dicom=refs,
    )
    logger.info(
        "case %s loaded: CT series %s (%d slices, grid %s, spacing %s mm), RT Structure Set %s, roles %s",
        cid, series_uid, len(geometry.slices), geometry.grid.shape,
        tuple(round(s, 4) for s in geometry.grid.spacing_mm), rtstruct.sop_uid,
        sorted(r.value for r in masks),
    )
    return case


def sanitise_case_id(text: str) -> str:
    """A case identifier safe for file names and logs.

    Parameters
    ----------
    text
        Usually a StudyInstanceUID (digits and dots, at most 64 characters).

    Returns
    -------
    str
        ``text`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``, leading dots
        removed, at most 64 characters; ``"case"`` when nothing is left.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip()).lstrip(".")[:64]
    return cleaned or "case"


def rasterise_polygons(
    polygons: Iterable[tuple[int, NDArray[np.float64]]], grid: Grid
) -> NDArray[np.bool_]:
    """Fill closed planar polygons onto a grid by the even-odd rule.

    A voxel is inside when its centre lies inside the polygons of its slice by the even-odd
    (crossing-number) rule, so several polygons on one slice are the XOR of their fills: a
    polygon inside another is a hole, disjoint polygons add. Scanline filling, vectorised over
    all polygons at once (one pass over the edges, no per-pixel test); the half-open crossing
    rule makes a centre exactly on a horizontal edge count consistently.

    Parameters
    ----------
    polygons
        ``(k, xy)`` pairs: slice index ``k`` of the grid (polygons on slices outside
        ``[0, nz)`` are ignored) and the polygon's vertices, shape ``(n, 2)``, patient x and y in
        mm; the polygon is closed implicitly (last vertex to first). Polygons with fewer than
        3 vertices are ignored.
    grid
        The grid to fill (its x/y origin and spacing place the vertices).

    Returns
    -------
    numpy.ndarray
        Boolean mask of shape ``grid.shape``.
    """
    nz, ny, nx = grid.shape
    mask = np.zeros(grid.shape, dtype=np.bool_)
    ox, oy, _ = grid.origin_mm
    dx, dy, _ = grid.spacing_mm
    ks: list[NDArray[np.int64]] = []
    us: list[NDArray[np.float64]] = []
    vs: list[NDArray[np.float64]] = []
    for k, xy in polygons:
        pts = np.asarray(xy, dtype=np.float64)
        if not 0 <= k < nz or pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2:
            continue
        ks.append(np.full(pts.shape[0], k, dtype=np.int64))
        us.append((pts[:, 0] - ox) / dx)
        vs.append((pts[:, 1] - oy) / dy)
    if not ks:
        return mask
    # Edges (u_a, v_a) -> (u_b, v_b) in continuous index units, each polygon closed.
    k_e = np.concatenate(ks)
    u_a = np.concatenate(us)
    v_a = np.concatenate(vs)
    u_b = np.concatenate([np.roll(u, -1) for u in us])
    v_b = np.concatenate([np.roll(v, -1) for v in vs])
    v_lo = np.minimum(v_a, v_b)
    v_hi = np.maximum(v_a, v_b)
    # Rows j (pixel-centre lines v = j) crossed by an edge: v_lo <= j < v_hi (half-open).
    j_lo = np.maximum(np.ceil(v_lo), 0).astype(np.int64)
    j_hi = np.minimum(np.ceil(v_hi) - 1, ny - 1).astype(np.int64)
    counts = np.maximum(j_hi - j_lo + 1, 0)
    total = int(counts.sum())
    if total == 0:
        return mask
    edge = np.repeat(np.arange(k_e.size), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    j = j_lo[edge] + offset
    t = (j - v_a[edge]) / (v_b[edge] - v_a[edge])  # v_b != v_a wherever counts > 0
    u = u_a[edge] + t * (u_b[edge] - u_a[edge])
    row = k_e[edge] * ny + j
    order = np.lexsort((u, row))
    row = row[order]
    u = u[order]
    # Every closed polygon crosses a row an even number of times, so consecutive crossings of a
    # row pair up into disjoint spans: the even-odd fill.
    row_s, u_s, u_e = row[0::2], u[0::2], u[1::2]
    i_s = np.clip(np.ceil(u_s), 0, nx).astype(np.int64)
    i_e = np.clip(np.floor(u_e), -1, nx - 1).astype(np.int64)
    keep = i_e >= i_s
    row_s, i_s, i_e = row_s[keep], i_s[keep], i_e[keep]
    if row_s.size == 0:
        return mask
    rows, inverse = np.unique(row_s, return_inverse=True)
    # +1 where a span starts, -1 just after it ends; the running sum along a row is 1 inside.
    # Spans of a row are disjoint, so no two starts (nor two ends) share a cell and plain fancy
    # indexing is exact; a start may meet the previous span's end, hence two separate updates.
    diff = np.zeros((rows.size, nx + 1), dtype=np.int8)
    diff[inverse, i_s] += 1
    diff[inverse, i_e + 1] -= 1
    mask.reshape(nz * ny, nx)[rows] = np.cumsum(diff, axis=1, dtype=np.int8)[:, :nx] > 0
    return mask


# ---------------------------------------------------------------------------------------------
# Reading the folder


def _read_header(path: Path) -> Dataset | None:
    """The dataset of a DICOM file without pixel data, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception as exc:  # a truncated or corrupt file must not stop the whole folder
        logger.warning("ignoring %s: not readable as DICOM (%s: %s)", path, type(exc).__name__, exc)
        return None
    # No 128-byte preamble: accept a raw dataset that starts with a group 0x0008 element.
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        if head != b"\x08\x00":
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds if "SOPClassUID" in ds else None
    except Exception as exc:
        logger.debug("ignoring %s: not DICOM (%s)", path, exc)
        return None


def _scan_folder(folder: Path) -> tuple[dict[str, list[_Instance]], list[_Instance]]:
    """CT instances grouped by SeriesInstanceUID, and the RT Structure Sets, found under a folder."""
    cts: dict[str, list[_Instance]] = {}
    rtstructs: list[_Instance] = []
    seen: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = _read_header(path)
        if ds is None:
            logger.debug("ignoring %s: not a DICOM file", path)
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        inst = _Instance(path, ds)
        if inst.sop_uid and inst.sop_uid in seen:
            logger.debug("ignoring %s: duplicate of SOP instance %s", path, inst.sop_uid)
            continue
        seen.add(inst.sop_uid)
        if sop_class == CT_IMAGE_STORAGE:
            cts.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(inst)
        elif sop_class == RT_STRUCTURE_SET_STORAGE:
            rtstructs.append(inst)
        elif sop_class == ENHANCED_CT_IMAGE_STORAGE:
            logger.warning(
                "ignoring %s (SOP instance %s): Enhanced CT (multi-frame) is not supported; "
                "export the CT as classic single-frame CT Image Storage", path, inst.sop_uid,
            )
        else:
            logger.debug("ignoring %s: SOP class %s is neither CT nor RT Structure Set", path, sop_class)
    return cts, rtstructs


# ---------------------------------------------------------------------------------------------
# Choosing the RT Structure Set and the CT series


def _rtstruct_frames(ds: Dataset) -> set[str]:
    """Frames of reference an RT Structure Set declares (referenced FoR sequence, else ROIs)."""
    frames = {
        str(item.FrameOfReferenceUID)
        for item in ds.get("ReferencedFrameOfReferenceSequence", [])
        if item.get("FrameOfReferenceUID")
    }
    if not frames:
        frames = {
            str(roi.ReferencedFrameOfReferenceUID)
            for roi in ds.get("StructureSetROISequence", [])
            if roi.get("ReferencedFrameOfReferenceUID")
        }
    return frames


def rtstruct_listed_images(ds: Dataset) -> set[str]:
    """SOP Instance UIDs an RT Structure Set lists for its referenced series
    (ReferencedFrameOfReferenceSequence > RTReferencedStudySequence > RTReferencedSeriesSequence >
    ContourImageSequence): usually every image of the CT series it was drawn on."""
    return {
        str(img.ReferencedSOPInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for ser in study.get("RTReferencedSeriesSequence", [])
        for img in ser.get("ContourImageSequence", [])
        if img.get("ReferencedSOPInstanceUID")
    }


def rtstruct_image_refs(ds: Dataset) -> set[str]:
    """SOP Instance UIDs of the images an RT Structure Set references (its series' contour image
    list and every contour's own references)."""
    return _rtstruct_series_and_images(ds)[1]


def _rtstruct_series_and_images(ds: Dataset) -> tuple[set[str], set[str]]:
    """Series UIDs and image SOP instance UIDs an RT Structure Set references."""
    series: set[str] = set()
    images: set[str] = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                if ser.get("SeriesInstanceUID"):
                    series.add(str(ser.SeriesInstanceUID))
                for img in ser.get("ContourImageSequence", []):
                    if img.get("ReferencedSOPInstanceUID"):
                        images.add(str(img.ReferencedSOPInstanceUID))
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            for img in contour.get("ContourImageSequence", []):
                if img.get("ReferencedSOPInstanceUID"):
                    images.add(str(img.ReferencedSOPInstanceUID))
    return series, images


def _series_frame(instances: Sequence[_Instance]) -> str:
    return str(instances[0].ds.get("FrameOfReferenceUID", ""))


def _choose_rtstruct(rtstructs: list[_Instance], cts: dict[str, list[_Instance]]) -> _Instance:
    """The RT Structure Set to plan on: the most recent one whose frame matches a CT series."""
    if len(rtstructs) == 1:
        return rtstructs[0]
    ct_frames = {_series_frame(v) for v in cts.values()}
    matching = [r for r in rtstructs if _rtstruct_frames(r.ds) & ct_frames] or rtstructs

    def stamp(r: _Instance) -> str:
        d = r.ds
        return (
            f"{d.get('StructureSetDate', '') or d.get('InstanceCreationDate', '')}"
            f"{d.get('StructureSetTime', '') or d.get('InstanceCreationTime', '')}"
        )

    ranked = sorted(matching, key=stamp, reverse=True)
    if len(ranked) > 1 and stamp(ranked[0]) == stamp(ranked[1]):
        raise InputError(
            f"several RT Structure Sets ({sorted(r.sop_uid for r in matching)}) fit the CT and none is "
            "more recent (StructureSetDate/Time); send only the structure set to plan on"
        )
    logger.info(
        "%d RT Structure Sets received; using the most recent, %s", len(rtstructs), ranked[0].sop_uid
    )
    return ranked[0]


def _choose_ct_series(cts: dict[str, list[_Instance]], rtstruct: _Instance) -> str:
    """The SeriesInstanceUID of the CT series the RT Structure Set contours."""
    frames = _rtstruct_frames(rtstruct.ds)
    if not frames:
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} ({rtstruct.path.name}) names no frame of reference "
            "(ReferencedFrameOfReferenceSequence is empty); export it again from the contouring system"
        )
    candidates = [uid for uid, inst in cts.items() if _series_frame(inst) in frames]
    if not candidates:
        found = ", ".join(f"{uid} (frame {_series_frame(inst)})" for uid, inst in sorted(cts.items()))
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} is in frame of reference {sorted(frames)}, which does not "
            f"match the frame of reference of any CT series received: {found}; send the CT series the "
            "structures were drawn on"
        )
    if len(candidates) == 1:
        return candidates[0]
    series_refs, image_refs = _rtstruct_series_and_images(rtstruct.ds)
    by_series = [uid for uid in candidates if uid in series_refs]
    if len(by_series) == 1:
        logger.info("several CT series in frame %s; the RT Structure Set references %s", frames, by_series[0])
        return by_series[0]
    by_image = [uid for uid in candidates if any(i.sop_uid in image_refs for i in cts[uid])]
    if len(by_image) == 1:
        logger.info("several CT series in frame %s; contour images belong to %s", frames, by_image[0])
        return by_image[0]
    raise InputError(
        f"several CT series ({sorted(candidates)}) share the frame of reference {sorted(frames)} of RT "
        f"Structure Set {rtstruct.sop_uid}, and its series and image references do not pick one; send "
        "only the planning CT series with the structure set"
    )


def _check_referenced_images(rtstruct: _Instance, series_uid: str, slices: Sequence[_Instance]) -> None:
    """Every CT image the structure set's contours reference is in the chosen series: a truncated
    series (slices not received) or a structure set drawn on other images is not planned."""
    refs = rtstruct_image_refs(rtstruct.ds)
    if not refs:
        return  # ContourImageSequence is optional; the frame of reference was checked
    present = {i.sop_uid for i in slices}
    missing = sorted(refs - present)
    if not missing:
        return
    if len(missing) == len(refs):
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} references {len(refs)} CT images and none of them is in CT "
            f"series {series_uid} ({len(slices)} images); the structures were drawn on other images: send the "
            "CT series they were drawn on"
        )
    raise InputError(
        f"RT Structure Set {rtstruct.sop_uid} references {len(refs)} CT images of which {len(missing)} were not "
        f"received (e.g. {missing[0]}); CT series {series_uid} has {len(slices)} images. The CT is incomplete: "
        "send the whole planning CT series, then the job is planned again (or airt jobs retry)"
    )


# ---------------------------------------------------------------------------------------------
# CT geometry and pixels


def _floats(value: object, n: int, what: str, inst: _Instance) -> NDArray[np.float64]:
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


def _ct_geometry(series_uid: str, instances: list[_Instance]) -> _CtGeometry:
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
    return _CtGeometry(
        slices=tuple(sorted_inst),
        grid=grid,
        transpose=transpose,
        flip_x=sx < 0,
        flip_y=sy < 0,
        iop=(iop_t[0], iop_t[1], iop_t[2], iop_t[3], iop_t[4], iop_t[5]),
    )


def _read_pixels(inst: _Instance, rows: int, cols: int) -> NDArray[np.float32]:
    """One CT slice in HU, as stored (rows x columns)."""
    try:
        ds = pydicom.dcmread(inst.path, force=True)
    except Exception as exc:
        raise InputError(f"CT slice {inst.sop_uid} ({inst.path.name}) cannot be read again: {exc}") from exc
    if "PixelData" not in ds:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) has no pixel data; send the series again"
        )
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) is not a greyscale image (SamplesPerPixel {spp}, "
            f"{ds.get('PhotometricInterpretation')}); send the original CT series"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    lossy = lossy_reason(syntax, ds.get("LossyImageCompression"))
    if lossy:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) is lossy-compressed: {lossy}. Its values are not the "
            "scanner's HU; send the original or a lossless copy (uncompressed, JPEG Lossless, JPEG-LS lossless, "
            "JPEG 2000 lossless or RLE)"
        )
    bits = int(ds.get("BitsAllocated", 16))
    if syntax in _UNCOMPRESSED_SYNTAXES or not syntax:
        expected = rows * cols * bits // 8
        got = len(ds.PixelData)
        if got not in (expected, expected + 1):  # one padding byte keeps the value length even
            raise InputError(
                f"CT slice {inst.sop_uid} ({inst.path.name}) has {got} bytes of pixel data, expected "
                f"{expected} for {rows}x{cols} pixels of {bits} bits; the file is damaged: send the series "
                "again"
            )
    try:
        arr = _native_pixels(ds, syntax, rows, cols)
        if arr is None:
            arr = ds.pixel_array
    except Exception as exc:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}): pixel data cannot be decoded (transfer syntax "
            f"{syntax}: {type(exc).__name__}: {exc}); send the CT uncompressed (Explicit VR Little Endian)"
        ) from exc
    if arr.shape != (rows, cols):
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) decodes to shape {arr.shape}, expected "
            f"({rows}, {cols}); the file is damaged: send the series again"
        )
    absent = [k for k in ("RescaleIntercept", "RescaleSlope") if ds.get(k) in (None, "")]
    if absent:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) lacks {' and '.join(absent)} (Type 1 in the CT Image "
            "module): its stored values cannot be turned into Hounsfield units, and a guess would put a "
            "wrong density under the dose. Send the series as the scanner wrote it"
        )
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _native_pixels(ds: Dataset, syntax: str, rows: int, cols: int) -> NDArray[np.integer] | None:
    """Uncompressed little-endian 16-bit pixels straight from the bytes (pydicom's decoder
    framework costs more than the copy); None for anything else, which pydicom decodes."""
    if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        return None
    stored = int(ds.get("BitsStored", 16))
    high_bit = int(ds.get("HighBit", stored - 1))
    if int(ds.get("BitsAllocated", 0)) != 16 or not 1 <= stored <= 16 or high_bit != stored - 1:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    arr = np.frombuffer(ds.PixelData, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if stored < 16:  # bits above BitsStored are not part of the value: sign-extend or mask them
        shift = 16 - stored
        arr = (arr << shift) >> shift if signed else arr & np.uint16((1 << stored) - 1)
    return arr


def _read_ct_volume(geometry: _CtGeometry) -> NDArray[np.float32]:
    """The CT in HU on the canonical grid ([z, y, x], indices increasing along +x, +y, +z)."""
    nz, ny, nx = geometry.grid.shape
    rows, cols = (nx, ny) if geometry.transpose else (ny, nx)
    volume = np.empty((nz, ny, nx), dtype=np.float32)
    for k, inst in enumerate(geometry.slices):
        sl = _read_pixels(inst, rows, cols)
        if geometry.transpose:
            sl = sl.T
        if geometry.flip_y:
            sl = sl[::-1, :]
        if geometry.flip_x:
            sl = sl[:, ::-1]
        volume[k] = sl
    return volume


def _patient_position(geometry: _CtGeometry) -> PatientPosition:
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


# ---------------------------------------------------------------------------------------------
# Structures


def _contour_points(contour: Dataset) -> NDArray[np.float64] | None:
    """ContourData as an (n, 3) array in mm, parsed from the raw bytes when possible."""
    if "ContourData" not in contour:
        return None
    elem = contour.get_item("ContourData")
    value = elem.value if elem is not None else None
    try:
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("ascii").replace("\\", " ")
            pts = np.asarray(text.split(), dtype=np.float64)
        else:
            pts = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
    except (ValueError, UnicodeDecodeError, TypeError):
        return None
    if pts.size == 0 or pts.size % 3 or not np.all(np.isfinite(pts)):
        return None
    return pts.reshape(-1, 3)


def _roi_polygons(
    contours: Sequence[Dataset], geometry: _CtGeometry, roi_label: str
) -> tuple[list[tuple[int, NDArray[np.float64]]], int, int, int]:
    """Closed planar contours of one ROI matched to CT slices.

    Returns the ``(k, xy)`` polygons, the number of CLOSED_PLANAR contours, the number that lay
    outside the CT, and the number dropped for fewer than 3 readable points.
    """
    grid = geometry.grid
    oz, dz, nz = grid.origin_mm[2], grid.spacing_mm[2], grid.shape[0]
    polys: list[tuple[int, NDArray[np.float64]]] = []
    closed = outside = degenerate = 0
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "")).strip().upper()
        if kind != "CLOSED_PLANAR":
            continue
        pts = _contour_points(contour)
        if pts is None or pts.shape[0] < 3:
            degenerate += 1
            continue
        closed += 1
        z = float(pts[:, 2].mean())
        if float(np.ptp(pts[:, 2])) > 0.5 * dz:
            logger.warning(
                "ROI %s: a contour spans %.2f mm in z (not axial); placed at its mean z %.2f mm",
                roi_label, float(np.ptp(pts[:, 2])), z,
            )
        k = int(np.rint((z - oz) / dz))
        if not 0 <= k < nz or abs(z - (oz + k * dz)) > 0.5 * dz + 1e-6:
            outside += 1
            continue
        polys.append((k, pts[:, :2]))
    return polys, closed, outside, degenerate


def _structure_masks(
    rtstruct: _Instance, ct_frame: str, geometry: _CtGeometry, structures: StructureSettings
) -> tuple[dict[Role, NDArray[np.bool_]], dict[Role, str]]:
    """Masks and original names of the ROIs that map to planning roles."""
    ds = rtstruct.ds
    frames = _rtstruct_frames(ds)
    if ct_frame not in frames:
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} is in frame of reference {sorted(frames)}, the CT in "
            f"{ct_frame}; the structures were drawn on another image: send the matching CT or structure set"
        )
    contours_by_roi: dict[int, Sequence[Dataset]] = {}
    for item in ds.get("ROIContourSequence", []):
        if item.get("ReferencedROINumber") is not None:
            contours_by_roi[int(item.ReferencedROINumber)] = item.get("ContourSequence", [])
    all_names: list[str] = []
    candidates: dict[Role, list[tuple[str, int, NDArray[np.bool_]]]] = {}
    for roi in ds.get("StructureSetROISequence", []):
        name = str(roi.get("ROIName", "") or "").strip()
        number = int(roi.ROINumber) if roi.get("ROINumber") is not None else -1
        all_names.append(name)
        role = structures.role_of(name)
        label = f"{name!r} (ROI {number}) of RT Structure Set {rtstruct.sop_uid}"
        if role is None:
            logger.debug("ROI %s maps to no role; not used for planning", label)
            continue
        roi_frame = str(roi.get("ReferencedFrameOfReferenceUID", "") or "")
        if roi_frame and roi_frame != ct_frame:
            raise InputError(
                f"ROI {label}, mapped to {role.value}, references frame of reference {roi_frame}, not the "
                f"CT's {ct_frame}; it was drawn on another image: register and copy it to the planning CT"
            )
        polys, closed, outside, degenerate = _roi_polygons(contours_by_roi.get(number, []), geometry, label)
        if role is Role.PTV and (outside or degenerate) and polys:
            z0, z1 = geometry.grid.origin_mm[2], geometry.grid.axes_mm()[2][-1]
            raise InputError(
                f"PTV {label}: "
                + (f"{outside} of {closed} contours lie outside the CT's slices (z {z0:.1f} to {z1:.1f} mm)"
                   if outside else "")
                + (" and " if outside and degenerate else "")
                + (f"{degenerate} contours have fewer than 3 readable points" if degenerate else "")
                + "; planning would leave part of the target out. "
                + ("Send the CT series covering the whole PTV" if outside else
                   "Correct the PTV in the contouring system and send the structure set again")
            )
        if outside:
            logger.warning("ROI %s: %d of %d contours lie outside the CT slices and were ignored",
                           label, outside, closed)
        if degenerate:
            logger.warning("ROI %s: %d contours with fewer than 3 readable points were left out", label, degenerate)
        mask = rasterise_polygons(polys, geometry.grid)
        voxels = int(np.count_nonzero(mask))
        if voxels == 0:
            if role is Role.PTV:
                why = "has no closed planar contour" if closed == 0 else "covers no CT voxel centre"
                logger.warning("PTV candidate %s %s", label, why)
            else:
                logger.warning("ROI %s (%s) is empty on the CT grid; it is left out", label, role.value)
            continue
        candidates.setdefault(role, []).append((name, voxels, mask))
    if Role.PTV not in candidates:
        ptv_names = [n for n in all_names if structures.role_of(n) is Role.PTV]
        if ptv_names:
            raise InputError(
                f"the PTV of RT Structure Set {rtstruct.sop_uid} ({ptv_names}) is empty: its contour set has "
                "no closed planar contour on the CT slices; contour the PTV on the planning CT and send it "
                "again"
            )
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} has no ROI recognised as the PTV; ROI names found: "
            f"{all_names}; name the PTV as the [structures] patterns of the configuration expect "
            "(patterns.ptv), or add a pattern for this clinic's name"
        )
    masks: dict[Role, NDArray[np.bool_]] = {}
    names: dict[Role, str] = {}
    for role, found in candidates.items():
        best = max(found, key=lambda c: c[1])
        if len(found) > 1:
            logger.info(
                "%d ROIs map to %s (%s); using the largest, %r (%d voxels)",
                len(found), role.value, [c[0] for c in found], best[0], best[1],
            )
        names[role] = best[0]
        masks[role] = best[2]
    if Role.BODY in masks:
        ptv_voxels = int(np.count_nonzero(masks[Role.PTV]))
        outside = int(np.count_nonzero(masks[Role.PTV] & ~masks[Role.BODY]))
        if outside > PTV_OUTSIDE_BODY_MAX_FRACTION * ptv_voxels:
            raise InputError(
                f"{100.0 * outside / ptv_voxels:.0f} % of the PTV {names[Role.PTV]!r} of RT Structure Set "
                f"{rtstruct.sop_uid} lies outside the body contour {names[Role.BODY]!r} (at most "
                f"{100.0 * PTV_OUTSIDE_BODY_MAX_FRACTION:.0f} % accepted); the PTV or the body was contoured "
                "on another image or shifted: correct the structure set and send it again"
            )
    return masks, names
