"""The RT Structure Set: the frames of reference, series and images it references, and its
contours' points.

``ContourData`` is parsed from the raw element bytes, which is 20x faster than pydicom's
per-value ``DSfloat`` conversion on large structure sets. Which ROIs become planning masks is
decided in :mod:`appliance.dicom.structures`.
"""

from __future__ import annotations

import enum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset


class ContourGeometricType(enum.StrEnum):
    """DICOM ContourGeometricType (3006,0042); only CLOSED_PLANAR contours are planned on."""

    POINT = "POINT"
    OPEN_PLANAR = "OPEN_PLANAR"
    OPEN_NONPLANAR = "OPEN_NONPLANAR"
    CLOSED_PLANAR = "CLOSED_PLANAR"


def rtstruct_frames(ds: Dataset) -> set[str]:
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
    return rtstruct_series_and_images(ds)[1]


def rtstruct_series_and_images(ds: Dataset) -> tuple[set[str], set[str]]:
    """Series UIDs and image SOP instance UIDs an RT Structure Set references (its series' contour
    image lists and every contour's own references)."""
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


def contour_points(contour: Dataset) -> NDArray[np.float64] | None:
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
