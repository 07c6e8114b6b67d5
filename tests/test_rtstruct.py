"""The RT Structure Set (appliance.dicom.rtstruct): a structure set written by structure_set_dataset,
saved and read back, gives the same references, ROIs and contour points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from appliance.dicom.common import save_dataset
from appliance.dicom.rtstruct import (
    ContourGeometricType,
    RoiContours,
    RoiInterpretedType,
    contour_points,
    rtstruct_frames,
    rtstruct_image_refs,
    rtstruct_listed_images,
    rtstruct_series_and_images,
    structure_set_dataset,
)
from appliance.dicom.uids import new_uid


def _ring(cx: float, cy: float, r: float, z: float, n: int = 24) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(a), cy + r * np.sin(a), np.full(n, z)])


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, dict[str, str], list[str], list[RoiContours]]:
    uids = {"study": new_uid(), "frame": new_uid(), "ct_series": new_uid(), "series": new_uid(), "sop": new_uid()}
    ct_uids = [new_uid() for _ in range(5)]
    rois = [
        RoiContours(name="BODY", interpreted_type=RoiInterpretedType.EXTERNAL, colour=(0, 255, 0),
                    contours=tuple((ct_uids[k], _ring(0.0, 0.0, 150.0, -5.0 + 2.5 * k)) for k in range(5))),
        RoiContours(name="PTV_4000", interpreted_type=RoiInterpretedType.PTV, colour=(255, 0, 0),
                    contours=((ct_uids[2], _ring(1.2345678, -20.0004, 25.5, 0.0)),
                              (ct_uids[3], _ring(1.0, -20.0, 20.0, 2.5, n=7)))),
        RoiContours(name="Empty", interpreted_type=RoiInterpretedType.ORGAN, colour=(1, 2, 3), contours=()),
    ]
    ds = structure_set_dataset(
        sop_instance_uid=uids["sop"], series_instance_uid=uids["series"], study_instance_uid=uids["study"],
        frame_of_reference_uid=uids["frame"], ct_series_instance_uid=uids["ct_series"],
        ct_sop_instance_uids=ct_uids, rois=rois, label="RS1", name="Test set", date="20240102", time="101500",
    )
    ds.StudyInstanceUID = uids["study"]
    path = tmp_path / "rs.dcm"
    save_dataset(ds, path)
    return path, uids, ct_uids, rois


def test_references_read_back(written: tuple[Path, dict[str, str], list[str], list[RoiContours]]) -> None:
    path, uids, ct_uids, _ = written
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.SOPInstanceUID == uids["sop"]
    assert (ds.StructureSetLabel, ds.StructureSetName, ds.StructureSetDate) == ("RS1", "Test set", "20240102")
    assert rtstruct_frames(ds) == {uids["frame"]}
    assert rtstruct_listed_images(ds) == set(ct_uids)
    assert rtstruct_image_refs(ds) == set(ct_uids)
    assert rtstruct_series_and_images(ds) == ({uids["ct_series"]}, set(ct_uids))


def test_rois_and_contour_points_read_back(written: tuple[Path, dict[str, str], list[str], list[RoiContours]]) -> None:
    path, uids, _, rois = written
    ds = pydicom.dcmread(path)
    names = [str(r.ROIName) for r in ds.StructureSetROISequence]
    assert names == [r.name for r in rois]
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == [1, 2, 3]
    assert {str(r.ReferencedFrameOfReferenceUID) for r in ds.StructureSetROISequence} == {uids["frame"]}
    assert [str(o.RTROIInterpretedType) for o in ds.RTROIObservationsSequence] == ["EXTERNAL", "PTV", "ORGAN"]
    for roi, item in zip(rois, ds.ROIContourSequence, strict=True):
        assert [int(v) for v in item.ROIDisplayColor] == list(roi.colour)
        if not roi.contours:
            assert "ContourSequence" not in item
            continue
        assert len(item.ContourSequence) == len(roi.contours)
        for (image_uid, xyz), contour in zip(roi.contours, item.ContourSequence, strict=True):
            assert contour.ContourGeometricType == ContourGeometricType.CLOSED_PLANAR
            assert int(contour.NumberOfContourPoints) == len(xyz)
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == image_uid
            points = contour_points(contour)  # from the raw element bytes of the file
            assert points is not None
            np.testing.assert_allclose(points, xyz, rtol=0, atol=0.0005 + 1e-12)  # written to micrometres


def test_contour_points_from_values_and_refusals() -> None:
    contour = Dataset()
    assert contour_points(contour) is None
    contour.ContourData = ["1", "2.5", "-3", "4", "5", "6"]
    np.testing.assert_array_equal(contour_points(contour), [[1.0, 2.5, -3.0], [4.0, 5.0, 6.0]])
    contour.ContourData = ["1", "2"]  # not a multiple of 3 values
    assert contour_points(contour) is None
