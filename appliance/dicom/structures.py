"""The ROIs of an RT Structure Set that map to planning roles, rasterised onto the CT grid.

Only ROIs whose name maps to a role (``[structures]`` of the configuration) are rasterised;
several ROIs of one role: the largest (in voxels) is kept. Contours are matched to CT slices
within half a slice spacing. A PTV with contours outside the CT or with fewer than 3 readable
points, no PTV, an empty PTV, an ROI or structure set in another frame of reference, and a PTV
largely outside the body are refused with an :class:`~core.errors.InputError` naming the ROI;
an OAR's unusable contours are left out with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from appliance.config import StructureSettings
from appliance.dicom.common import DicomFile
from appliance.dicom.ct import CtGeometry
from appliance.dicom.rasterise import rasterise_polygons
from appliance.dicom.rtstruct import ContourGeometricType, contour_points, rtstruct_frames
from core.case import Role
from core.errors import InputError

logger = logging.getLogger(__name__)

#: Largest fraction of PTV voxels outside the BODY contour (skin-flash margins) before the case is refused.
PTV_OUTSIDE_BODY_MAX_FRACTION = 0.10


def roi_polygons(
    contours: Sequence[Dataset], geometry: CtGeometry, roi_label: str
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
        if kind != ContourGeometricType.CLOSED_PLANAR:
            continue
        pts = contour_points(contour)
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


def structure_masks(
    rtstruct: DicomFile, ct_frame: str, geometry: CtGeometry, structures: StructureSettings
) -> tuple[dict[Role, NDArray[np.bool_]], dict[Role, str]]:
    """Masks and original names of the ROIs that map to planning roles."""
    ds = rtstruct.ds
    frames = rtstruct_frames(ds)
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
        polys, closed, outside, degenerate = roi_polygons(contours_by_roi.get(number, []), geometry, label)
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
