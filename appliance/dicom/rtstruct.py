"""The RT Structure Set: its enumerated values, a writer (:func:`structure_set_dataset`), and the
readers of the frames of reference, series and images it references and of its contours' points.

``ContourData`` is parsed from the raw element bytes, which is 20x faster than pydicom's
per-value ``DSfloat`` conversion on large structure sets. Which ROIs become planning masks is
decided in :mod:`appliance.dicom.structures`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, RTStructureSetStorage

#: ReferencedSOPClassUID of the RTReferencedStudySequence item: the Detached Study Management SOP
#: Class (retired), the value RT Structure Sets conventionally carry there.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


class ContourGeometricType(enum.StrEnum):
    """DICOM ContourGeometricType (3006,0042); only CLOSED_PLANAR contours are planned on."""

    POINT = "POINT"
    OPEN_PLANAR = "OPEN_PLANAR"
    OPEN_NONPLANAR = "OPEN_NONPLANAR"
    CLOSED_PLANAR = "CLOSED_PLANAR"


class RoiInterpretedType(enum.StrEnum):
    """DICOM RTROIInterpretedType (3006,00A4) values this writer uses."""

    EXTERNAL = "EXTERNAL"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"
    ORGAN = "ORGAN"


class RoiGenerationAlgorithm(enum.StrEnum):
    """DICOM ROIGenerationAlgorithm (3006,0036)."""

    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"


@dataclass(frozen=True, eq=False)
class RoiContours:
    """One ROI to write: its name, type, display colour and closed planar contours.

    Attributes
    ----------
    name
        ROIName (and ROIObservationLabel), at most 64 characters.
    interpreted_type
        RTROIInterpretedType.
    colour
        ROIDisplayColor, RGB 0-255.
    contours
        ``(image_uid, points)`` pairs: the SOP Instance UID of the CT image the contour lies on and
        its vertices, shape ``(n, 3)``, patient x, y, z in mm (n >= 3; closed implicitly). An ROI
        without contours is written without a ContourSequence.
    """

    name: str
    interpreted_type: RoiInterpretedType
    colour: tuple[int, int, int]
    contours: tuple[tuple[str, NDArray[np.float64]], ...]


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


def structure_set_dataset(
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    study_instance_uid: str,
    frame_of_reference_uid: str,
    ct_series_instance_uid: str,
    ct_sop_instance_uids: Sequence[str],
    rois: Sequence[RoiContours],
    label: str,
    name: str,
    date: str,
    time: str,
    algorithm: RoiGenerationAlgorithm = RoiGenerationAlgorithm.AUTOMATIC,
) -> Dataset:
    """An RT Structure Set on one CT series: the Structure Set, ROI Contour and RT ROI Observations
    modules and the SOP Common UIDs.

    Parameters
    ----------
    sop_instance_uid, series_instance_uid
        UIDs of the structure set and of its series.
    study_instance_uid, frame_of_reference_uid, ct_series_instance_uid, ct_sop_instance_uids
        The CT it was drawn on: its study, frame of reference, series and every image (listed in
        the referenced series' ContourImageSequence).
    rois
        The ROIs, numbered 1, 2, ... in this order (ROINumber, ObservationNumber).
    label, name
        StructureSetLabel (at most 16 characters) and StructureSetName.
    date, time
        StructureSetDate (YYYYMMDD) and StructureSetTime (HHMMSS).
    algorithm
        ROIGenerationAlgorithm of every ROI.

    Returns
    -------
    pydicom.dataset.Dataset
        The structure set without the Patient, General Study, General Equipment and series
        description attributes, which the caller adds. Contour coordinates are written with 3
        decimals (micrometres), trailing zeros dropped.
    """
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label
    ds.StructureSetName = name
    ds.StructureSetDate = date
    ds.StructureSetTime = time

    series = Dataset()
    series.SeriesInstanceUID = ct_series_instance_uid
    series.ContourImageSequence = DicomSequence([_image_ref(u) for u in ct_sop_instance_uids])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    roi_seq, contour_seq, obs_seq = [], [], []
    for number, roi_in in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
        roi.ROIName = roi_in.name
        roi.ROIGenerationAlgorithm = algorithm.value
        roi_seq.append(roi)
        contours = []
        for image_uid, xyz in roi_in.contours:
            c = Dataset()
            c.ContourImageSequence = DicomSequence([_image_ref(image_uid)])
            c.ContourGeometricType = ContourGeometricType.CLOSED_PLANAR.value
            c.NumberOfContourPoints = len(xyz)
            c.ContourData = [f"{v:.3f}".rstrip("0").rstrip(".") for v in np.asarray(xyz).ravel()]
            contours.append(c)
        rc = Dataset()
        rc.ROIDisplayColor = list(roi_in.colour)
        rc.ReferencedROINumber = number
        if contours:
            rc.ContourSequence = DicomSequence(contours)
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.ROIObservationLabel = roi_in.name
        obs.RTROIInterpretedType = roi_in.interpreted_type.value
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = DicomSequence(roi_seq)
    ds.ROIContourSequence = DicomSequence(contour_seq)
    ds.RTROIObservationsSequence = DicomSequence(obs_seq)
    return ds


def _image_ref(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid
    return item
