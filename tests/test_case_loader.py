"""DICOM input -> Case: geometry, HU, rasterisation and every refusal, on files written here with
pydicom and on real files (dicompyler-core example data, pydicom's test files)."""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, RLELossless, RTStructureSetStorage, generate_uid

from appliance.config import StructureSettings
from appliance.dicom.case_loader import load_folder, sanitise_case_id
from core.case import Grid, PatientPosition, Prescription, Role, mask_bbox, mask_voxels
from core.errors import InputError
from tests.conftest import require_tool

DATA = Path(__file__).parent / "data" / "dicompyler_example"
RX = Prescription(dose_gy=40.0, fractions=5)
STRUCTURES = StructureSettings()

# Typical ImageOrientationPatient of an axial scan in each supported patient position.
IOP_OF = {
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}


# ---------------------------------------------------------------------------------------------
# Writers of small test series


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _common(ds: Dataset, study_uid: str) -> None:
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM01"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "test"


@dataclass
class CtSpec:
    """A small axial CT series written as stored pixels + per-slice positions."""

    stored: NDArray[np.int16]  # [slice, row, column] as stored in the files
    ipps: NDArray[np.float64]  # [slice, 3] ImagePositionPatient
    iop: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    position: str = "HFS"
    slope: float = 1.0
    intercepts: NDArray[np.float64] | None = None
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_uid: str = field(default_factory=generate_uid)
    sop_uids: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def intercept(self, s: int) -> float:
        return -1024.0 if self.intercepts is None else float(self.intercepts[s])

    def hu(self) -> NDArray[np.float64]:
        icpt = np.array([self.intercept(s) for s in range(self.stored.shape[0])])
        return self.stored.astype(np.float64) * self.slope + icpt[:, None, None]

    def patient_xyz(self) -> NDArray[np.float64]:
        """Patient coordinates of every stored pixel centre, [slice, row, column, 3] (DICOM C.7.6.2.1.1)."""
        _, rows, cols = self.stored.shape
        rc = np.array(self.iop[:3])
        cc = np.array(self.iop[3:])
        dr, dc = self.pixel_spacing
        r = np.arange(rows)[None, :, None, None]
        c = np.arange(cols)[None, None, :, None]
        return self.ipps[:, None, None, :] + c * dc * rc + r * dr * cc


def make_ct(
    *,
    position: str = "HFS",
    rows: int = 48,
    cols: int = 64,
    nslices: int = 20,
    pixel_spacing: tuple[float, float] = (2.0, 1.5),
    dz: float = 2.5,
    seed: int = 0,
    iop: tuple[float, ...] | None = None,
) -> CtSpec:
    """A CT whose pixel centres cover x in [-47.25, 47.25], y in [-47, 47], z in [-25, 22.5] mm
    (HFS numbers; other positions flip the stored order but cover the same box)."""
    rng = np.random.default_rng(seed)
    iop = iop or IOP_OF[position]
    rc, cc = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(rc, cc)
    dr, dc = pixel_spacing
    centre = np.zeros(3)
    # The first pixel sits half the in-plane extent back along the row and column directions.
    first = centre - rc * dc * (cols - 1) / 2 - cc * dr * (rows - 1) / 2
    z = -25.0 + dz * np.arange(nslices)
    if normal[2] < 0:
        z = z[::-1]
    ipps = np.array([[first[0], first[1], zz] for zz in z])
    stored = rng.integers(0, 2000, size=(nslices, rows, cols)).astype(np.int16)
    return CtSpec(stored=stored, ipps=ipps, iop=iop, pixel_spacing=pixel_spacing, position=position)


def write_ct(spec: CtSpec, folder: Path, *, shuffle: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = spec.stored.shape
    spec.sop_uids = [generate_uid() for _ in range(n)]
    spec.paths = []
    order = list(range(n))
    if shuffle:
        random.Random(4).shuffle(order)
    for s in order:
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, spec.sop_uids[s])
        _common(ds, spec.study_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = spec.sop_uids[s]
        ds.Modality = "CT"
        ds.SeriesInstanceUID = spec.series_uid
        ds.SeriesNumber = 1
        ds.FrameOfReferenceUID = spec.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = spec.position
        ds.InstanceNumber = s + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in spec.ipps[s]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in spec.iop]
        ds.PixelSpacing = [f"{v:.4f}" for v in spec.pixel_spacing]
        ds.SliceThickness = "9.9"  # deliberately wrong: spacing must come from the positions
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{spec.slope:g}"
        ds.RescaleIntercept = f"{spec.intercept(s):g}"
        ds.KVP = "120"
        ds.PixelData = spec.stored[s].astype("<i2").tobytes()
        path = folder / f"ct_{s:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        spec.paths.append(path)
    # paths in slice order for edits
    spec.paths = [folder / f"ct_{s:03d}.dcm" for s in range(n)]


@dataclass
class Roi:
    name: str
    contours: list[tuple[float, NDArray[np.float64]]]  # (z mm, xy polygon (n, 2) mm)
    frame_uid: str | None = None  # None: the structure set's frame


def write_rtstruct(path: Path, spec: CtSpec, rois: list[Roi], *, frame_uid: str | None = None,
                   reference_series: bool = True) -> str:
    frame = frame_uid or spec.frame_uid
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(RTStructureSetStorage, sop_uid)
    _common(ds, spec.study_uid)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 2
    ds.StructureSetLabel = "test"
    ds.StructureSetDate = "20240101"
    ds.StructureSetTime = "120000"
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame
    if reference_series:
        ser = Dataset()
        ser.SeriesInstanceUID = spec.series_uid
        ser.ContourImageSequence = Sequence()
        for uid in spec.sop_uids:
            img = Dataset()
            img.ReferencedSOPClassUID = CTImageStorage
            img.ReferencedSOPInstanceUID = uid
            ser.ContourImageSequence.append(img)
        study = Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = spec.study_uid
        study.RTReferencedSeriesSequence = Sequence([ser])
        ref_frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    ds.RTROIObservationsSequence = Sequence()
    for n, roi in enumerate(rois, start=1):
        ssroi = Dataset()
        ssroi.ROINumber = n
        ssroi.ReferencedFrameOfReferenceUID = roi.frame_uid or frame
        ssroi.ROIName = roi.name
        ssroi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(ssroi)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = [255, 0, 0]
        if roi.contours:
            rc.ContourSequence = Sequence()
            for z, xy in roi.contours:
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(xy)
                pts = np.column_stack([xy, np.full(len(xy), z)])
                c.ContourData = [f"{v:.4f}" for v in pts.ravel()]
                rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = n
        obs.RTROIInterpretedType = "ORGAN"
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def square(cx: float, cy: float, half: float) -> NDArray[np.float64]:
    lo_x, hi_x, lo_y, hi_y = cx - half, cx + half, cy - half, cy + half
    return np.array([[lo_x, lo_y], [hi_x, lo_y], [hi_x, hi_y], [lo_x, hi_y]])


def circle(cx: float, cy: float, r: float, n: int = 180) -> NDArray[np.float64]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(a), cy + r * np.sin(a)])


def slice_z(spec: CtSpec) -> NDArray[np.float64]:
    return np.sort(spec.ipps[:, 2])


def standard_rois(spec: CtSpec) -> list[Roi]:
    z = slice_z(spec)
    return [
        Roi("BODY", [(zz, square(0.0, 0.0, 44.0)) for zz in z]),
        Roi("PTV_40", [(zz, circle(3.0, -2.0, 20.0)) for zz in z[5:15]]),
        # a hole: outer 30 mm square with a 14 mm square cut out
        Roi("Rectum", [(zz, c) for zz in z[4:10]
                       for c in (square(-20.0, 25.0, 15.0), square(-20.0, 25.0, 7.0))]),
        # two contours on each slice
        Roi("Bladder", [(zz, c) for zz in z[8:12]
                        for c in (square(-30.0, -30.0, 6.0), square(30.0, -30.0, 6.0))]),
        Roi("Couch", [(zz, square(0.0, 40.0, 3.0)) for zz in z]),
    ]


def build(
    tmp_path: Path, *, position: str = "HFS", shuffle: bool = False, **kw: object
) -> tuple[Path, CtSpec]:
    spec = make_ct(position=position, **kw)  # type: ignore[arg-type]
    folder = tmp_path / "case"
    write_ct(spec, folder / "ct", shuffle=shuffle)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    return folder, spec


def grid_xyz(grid: Grid) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    x, y, z = grid.axes_mm()
    return x, y, z


def centres_inside(grid: Grid, inside: object) -> int:
    """Count of voxel centres of one slice for which ``inside(x, y)`` holds."""
    x, y, _ = grid.axes_mm()
    xx, yy = np.meshgrid(x, y)
    return int(np.count_nonzero(inside(xx, yy)))  # type: ignore[operator]


def edit(path: Path, fn: object) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)  # type: ignore[operator]
    ds.save_as(path, enforce_file_format=True)


def load(folder: Path, structures: StructureSettings = STRUCTURES):  # type: ignore[no-untyped-def]
    return load_folder(folder, structures=structures, prescription=RX)


# ---------------------------------------------------------------------------------------------
# CT: HU and geometry


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_geometry_every_stored_pixel_lands_at_its_patient_coordinate(tmp_path: Path, position: str) -> None:
    folder, spec = build(tmp_path, position=position)
    case = load(folder)
    g = case.grid
    assert case.patient_position == PatientPosition(position)
    assert g.shape == (20, 48, 64)
    assert g.spacing_mm == pytest.approx((1.5, 2.0, 2.5))
    assert g.origin_mm == pytest.approx((-47.25, -47.0, -25.0))
    # Every stored pixel, placed by the DICOM definition, must be found at that place in the case.
    xyz = spec.patient_xyz().reshape(-1, 3)
    idx = (xyz - np.array(g.origin_mm)) / np.array(g.spacing_mm)
    assert np.allclose(idx, np.rint(idx), atol=1e-3)
    i, j, k = np.rint(idx).astype(int).T
    np.testing.assert_array_equal(case.ct_hu[k, j, i], spec.hu().ravel().astype(np.float32))
    assert case.dicom is not None
    assert case.dicom.image_orientation == pytest.approx(IOP_OF[position])


def test_marker_voxel_at_known_patient_coordinate_hfp(tmp_path: Path) -> None:
    spec = make_ct(position="HFP")
    spec.stored[:] = 1024  # water
    # HFP: rows run -x, columns run -y. Stored pixel (row 3, col 5) of the slice at z = -10 mm:
    s = int(np.flatnonzero(np.isclose(spec.ipps[:, 2], -10.0))[0])
    spec.stored[s, 3, 5] = 3024  # 2000 HU
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    case = load(folder)
    k, j, i = (int(v[0]) for v in np.nonzero(case.ct_hu == 2000.0))
    x, y, z = case.grid.axes_mm()
    # IPP of HFP first pixel is (+47.25, +47) and rows step -x by 1.5 mm, columns step -y by 2 mm.
    assert (x[i], y[j], z[k]) == pytest.approx((47.25 - 5 * 1.5, 47.0 - 3 * 2.0, -10.0))
    assert np.count_nonzero(case.ct_hu == 2000.0) == 1


def test_transposed_axial_orientation(tmp_path: Path) -> None:
    # Rows along +y, columns along +x: still axial, the loader transposes.
    folder, spec = build(tmp_path, iop=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    case = load(folder)
    xyz = spec.patient_xyz().reshape(-1, 3)
    idx = np.rint((xyz - np.array(case.grid.origin_mm)) / np.array(case.grid.spacing_mm)).astype(int)
    np.testing.assert_array_equal(case.ct_hu[idx[:, 2], idx[:, 1], idx[:, 0]], spec.hu().ravel())


def test_hu_from_slope_and_per_slice_intercept(tmp_path: Path) -> None:
    spec = make_ct()
    spec.slope = 2.0
    spec.intercepts = np.linspace(-1000.0, -1019.0, spec.stored.shape[0])
    spec.stored[:, 10, 10] = 512
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    case = load(folder)
    assert case.ct_hu.dtype == np.float32
    # HFS: stored (row 10, col 10) is voxel [k, 10, 10]; slice k is the k-th by z.
    np.testing.assert_allclose(case.ct_hu[:, 10, 10], 2.0 * 512 + spec.intercepts)
    assert case.ct_hu.min() >= -1019.0 and case.ct_hu.max() <= 2 * 1999 - 1000.0


def test_shuffled_slice_order_and_ignored_non_dicom_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, spec = build(tmp_path, shuffle=True)
    (folder / "notes.txt").write_text("not DICOM\n")
    (folder / "ct" / "DICOMDIR_junk.bin").write_bytes(b"\x00" * 300)
    with caplog.at_level(logging.DEBUG, logger="appliance.dicom.case_loader"):
        case = load(folder)
    np.testing.assert_array_equal(case.ct_hu, spec.hu().astype(np.float32))  # HFS: stored order is canonical
    assert "notes.txt" in caplog.text
    assert "Test^Phantom" not in caplog.text  # never the patient name


def test_dicom_refs_case_id_and_names(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    case = load(folder)
    refs = case.dicom
    assert refs is not None
    assert refs.study_instance_uid == spec.study_uid
    assert refs.frame_of_reference_uid == spec.frame_uid
    assert refs.ct_series_instance_uid == spec.series_uid
    assert Path(refs.rtstruct_path).name == "rs.dcm"
    assert pydicom.dcmread(refs.rtstruct_path).SOPInstanceUID == refs.rtstruct_sop_instance_uid
    assert pydicom.dcmread(refs.source_ct_path).SeriesInstanceUID == spec.series_uid
    assert case.case_id == spec.study_uid
    assert case.prescription == RX
    assert case.structure_names == {
        Role.BODY: "BODY", Role.PTV: "PTV_40", Role.RECTUM: "Rectum", Role.BLADDER: "Bladder"
    }
    assert set(case.masks) == {Role.BODY, Role.PTV, Role.RECTUM, Role.BLADDER}  # "Couch" maps to no role
    named = load_folder(folder, structures=STRUCTURES, prescription=RX, case_id="pat 1/../x")
    assert named.case_id == "pat_1_.._x"
    assert sanitise_case_id("...") == "case"


# ---------------------------------------------------------------------------------------------
# Structures


def test_masks_match_analytic_shapes(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    case = load(folder)
    g = case.grid
    z = slice_z(spec)
    ptv = case.masks[Role.PTV]
    # The PTV is on slices 5..14 only.
    assert set(np.flatnonzero(ptv.any(axis=(1, 2)))) == set(range(5, 15))
    # Each slice: the voxel centres strictly inside the 180-gon (radius 20 mm) ...
    inscribed = 20.0 * np.cos(np.pi / 180)
    lower = centres_inside(g, lambda x, y: np.hypot(x - 3.0, y + 2.0) < inscribed - 1e-6)
    upper = centres_inside(g, lambda x, y: np.hypot(x - 3.0, y + 2.0) <= 20.0 + 1e-6)
    for k in range(5, 15):
        assert lower <= int(ptv[k].sum()) <= upper
    # ... and the area is the circle's within pixelisation error.
    area = ptv[7].sum() * g.spacing_mm[0] * g.spacing_mm[1]
    assert area == pytest.approx(np.pi * 20.0**2, rel=0.04)
    vol_cc = ptv.sum() * g.voxel_volume_cc
    assert vol_cc == pytest.approx(np.pi * 20.0**2 * 10 * 2.5 / 1000, rel=0.04)
    # Squares: exact counts of centres inside.
    both = centres_inside(
        g, lambda x, y: ((np.abs(x + 30) < 6) | (np.abs(x - 30) < 6)) & (np.abs(y + 30) < 6)
    )
    bladder = case.masks[Role.BLADDER]
    assert [int(bladder[k].sum()) for k in range(20)] == [both if 8 <= k < 12 else 0 for k in range(20)]
    assert z[8] == pytest.approx(g.axes_mm()[2][8])


def test_hole_by_even_odd_rule(tmp_path: Path) -> None:
    folder, _ = build(tmp_path)
    case = load(folder)
    g = case.grid
    ring = centres_inside(
        g,
        lambda x, y: (np.maximum(np.abs(x + 20), np.abs(y - 25)) < 15)
        & ~(np.maximum(np.abs(x + 20), np.abs(y - 25)) <= 7),
    )
    rectum = case.masks[Role.RECTUM]
    assert [int(rectum[k].sum()) for k in range(4, 10)] == [ring] * 6
    x, y, _ = g.axes_mm()
    i_c = int(np.argmin(np.abs(x + 20)))
    j_c = int(np.argmin(np.abs(y - 25)))
    assert not rectum[5, j_c, i_c]  # centre of the hole is outside
    assert rectum[5, j_c, int(np.argmin(np.abs(x + 31)))]  # the ring is inside


def test_largest_of_several_ptv_candidates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    rois = [
        Roi("PTV_small", [(zz, circle(0, 0, 5)) for zz in z[8:10]]),
        Roi("PTV", [(zz, circle(0, 0, 15)) for zz in z[6:12]]),
        Roi("ptv1", [(zz, circle(0, 0, 10)) for zz in z[6:12]]),
    ]
    write_rtstruct(folder / "rs.dcm", spec, rois)
    with caplog.at_level(logging.INFO, logger="appliance.dicom.structures"):
        case = load(folder, StructureSettings(patterns={"ptv": (r"ptv.*",)}))
    assert case.structure_names[Role.PTV] == "PTV"
    assert "largest" in caplog.text and "'PTV'" in caplog.text


def test_contours_between_slices_use_half_slice_tolerance(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    rois = [
        Roi("PTV", [(z[5] + 1.2, square(0, 0, 10)), (z[9] - 1.2, square(0, 0, 10))]),
        Roi("Bladder", [(z[3], square(0, 0, 5)), (z[-1] + 5.0, square(0, 0, 5))]),  # beyond the CT: left out
    ]
    write_rtstruct(folder / "rs.dcm", spec, rois)
    case = load(folder)
    assert list(np.flatnonzero(case.masks[Role.PTV].any(axis=(1, 2)))) == [5, 9]
    assert list(np.flatnonzero(case.masks[Role.BLADDER].any(axis=(1, 2)))) == [3]


# ---------------------------------------------------------------------------------------------
# Several series


def test_chooses_ct_series_by_frame_of_reference(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    other = make_ct(seed=3, nslices=12)  # another series in another frame of reference
    write_ct(other, folder / "other_ct")
    case = load(folder)
    assert case.dicom is not None and case.dicom.ct_series_instance_uid == spec.series_uid


def test_chooses_ct_series_by_series_reference_in_one_frame(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    other = make_ct(seed=3, nslices=12)
    other.frame_uid = spec.frame_uid
    other.study_uid = spec.study_uid
    write_ct(other, folder / "other_ct")
    case = load(folder)
    assert case.dicom is not None and case.dicom.ct_series_instance_uid == spec.series_uid


def test_refuses_several_series_without_a_way_to_choose(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder / "a")
    other = make_ct(seed=3, nslices=12)
    other.frame_uid = spec.frame_uid
    write_ct(other, folder / "b")
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec), reference_series=False)
    with pytest.raises(InputError, match="2 CT series share the Frame of Reference") as err:
        load(folder)
    assert spec.series_uid in str(err.value) and other.series_uid in str(err.value)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refuses_no_ct(tmp_path: Path) -> None:
    folder, _ = build(tmp_path)
    shutil.rmtree(folder / "ct")
    with pytest.raises(InputError, match="no CT image"):
        load(folder)


def test_refuses_no_rtstruct(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    (folder / "rs.dcm").unlink()
    with pytest.raises(InputError, match="no RT Structure Set") as err:
        load(folder)
    assert spec.series_uid in str(err.value)


def test_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load(tmp_path / "nope")


def test_refuses_missing_slices(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    spec.paths[7].unlink()
    with pytest.raises(InputError, match="references 20 CT images of which 1 were not received") as err:
        load(folder)
    assert spec.series_uid in str(err.value)
    # Without image references the gap in the slice positions says the same.
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec), reference_series=False)
    with pytest.raises(InputError, match="missing slices") as err:
        load(folder)
    assert spec.series_uid in str(err.value)


def test_refuses_uneven_spacing(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    shifted = -25.0 + 7 * 2.5 + 1.0
    edit(spec.paths[7],
         lambda ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], shifted]))
    with pytest.raises(InputError, match="uneven slice spacing"):
        load(folder)


def test_refuses_duplicate_slice_positions(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    edit(spec.paths[7], lambda ds: setattr(ds, "ImagePositionPatient", list(spec.ipps[6])))
    with pytest.raises(InputError, match="same position"):
        load(folder)


def test_refuses_gantry_tilt(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    for p in spec.paths:
        edit(p, lambda ds: setattr(ds, "GantryDetectorTilt", "15"))
    with pytest.raises(InputError, match="gantry tilt"):
        load(folder)


def test_refuses_non_axial_orientation(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    spec = make_ct(iop=(1.0, 0.0, 0.0, 0.0, c, s))
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    with pytest.raises(InputError, match="non-axial"):
        load(folder)


def test_refuses_sheared_positions(tmp_path: Path) -> None:
    # Axial IOP but the in-plane position drifts from slice to slice (tilt expressed only in IPP).
    spec = make_ct()
    spec.ipps[:, 1] += np.arange(spec.ipps.shape[0]) * 0.8
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    with pytest.raises(InputError, match="tilted"):
        load(folder)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("spacing", "inconsistent pixel spacing"),
        ("size", "different sizes"),
        ("orientation", "inconsistent ImageOrientationPatient"),
    ],
)
def test_refuses_inconsistent_slices(tmp_path: Path, change: str, words: str) -> None:
    folder, spec = build(tmp_path)

    def fn(ds: Dataset) -> None:
        if change == "spacing":
            ds.PixelSpacing = ["2.0", "1.6"]
        elif change == "size":
            ds.Rows = 32
            ds.PixelData = spec.stored[4, :32].astype("<i2").tobytes()
        else:
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]

    edit(spec.paths[4], fn)
    with pytest.raises(InputError, match=words):
        load(folder)


def test_refuses_pixel_data_of_wrong_size(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    edit(spec.paths[3], lambda ds: setattr(ds, "PixelData", ds.PixelData[:-128]))
    with pytest.raises(InputError, match="bytes of pixel data") as err:
        load(folder)
    assert spec.sop_uids[3] in str(err.value)


def test_refuses_unsupported_patient_position(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    for p in spec.paths:
        edit(p, lambda ds: setattr(ds, "PatientPosition", "HFDL"))
    with pytest.raises(InputError, match="PatientPosition HFDL"):
        load(folder)


def test_refuses_no_ptv_and_lists_names(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    rois = [Roi("Bladder", [(z[3], square(0, 0, 5))]), Roi("CTV_x", [(z[3], square(0, 0, 5))])]
    write_rtstruct(folder / "rs.dcm", spec, rois)
    with pytest.raises(InputError, match="no ROI recognised as the PTV") as err:
        load(folder)
    msg = str(err.value)
    assert "Bladder" in msg and "CTV_x" in msg and "[structures]" in msg


def test_refuses_empty_ptv(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    write_rtstruct(folder / "rs.dcm", spec, [Roi("PTV", []), Roi("Bladder", [(z[3], square(0, 0, 5))])])
    with pytest.raises(InputError, match=r"PTV .* is empty"):
        load(folder)


def test_refuses_ptv_outside_the_ct(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, [Roi("PTV", [(200.0, square(0, 0, 10))])])
    with pytest.raises(InputError, match="is empty"):
        load(folder)


def test_refuses_rtstruct_in_another_frame(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    other_frame = generate_uid()
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec), frame_uid=other_frame)
    with pytest.raises(InputError, match=r"does not\s+match the frame of reference") as err:
        load(folder)
    assert other_frame in str(err.value) and spec.frame_uid in str(err.value)


def test_refuses_roi_in_another_frame(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    rois = standard_rois(spec)
    rois[1].frame_uid = generate_uid()  # the PTV
    write_rtstruct(folder / "rs.dcm", spec, rois)
    with pytest.raises(InputError, match=r"PTV_40.*references frame of reference"):
        load(folder)


def test_refuses_single_slice(tmp_path: Path) -> None:
    spec = make_ct(nslices=1)
    folder = tmp_path / "case"
    write_ct(spec, folder)
    write_rtstruct(folder / "rs.dcm", spec, standard_rois(spec))
    with pytest.raises(InputError, match="only 1 slice"):
        load(folder)


# ---------------------------------------------------------------------------------------------
# Real files


def test_dicompyler_example_folder_is_refused_clearly() -> None:
    # One real CT slice + a real structure set (plus an RT Plan and RT Dose that must be ignored).
    with pytest.raises(InputError, match="references 98 CT images of which 97 were not received"):
        load(DATA)


def _shoelace(xy: NDArray[np.float64]) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_dicompyler_structure_set_on_a_volume_of_real_slices(tmp_path: Path) -> None:
    # Build a volume from copies of the real slice at the structure set's 3 mm slice positions
    # covering the tumour bed, then rasterise the real contours.
    real = pydicom.dcmread(DATA / "ct.dcm")
    z0 = float(real.ImagePositionPatient[2])
    folder = tmp_path / "case"
    folder.mkdir()
    ks = range(49, 71)  # z = 168.56 - 3k: -41.44 ... 21.56 mm
    for k in ks:
        ds = pydicom.dcmread(DATA / "ct.dcm")
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.ImagePositionPatient = [*real.ImagePositionPatient[:2], f"{z0 - 3.0 * k:.4f}"]
        ds.save_as(folder / f"ct_{k}.dcm")
    # The copies have new UIDs, so the structure set's image references are dropped (they would
    # rightly be refused as images the structures were not drawn on); its frame still matches.
    rtss = pydicom.dcmread(DATA / "rtss.dcm")
    for frame in rtss.ReferencedFrameOfReferenceSequence:
        del frame.RTReferencedStudySequence
    for roi in rtss.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            if "ContourImageSequence" in contour:
                del contour.ContourImageSequence
    rtss.save_as(folder / "rtss.dcm")
    structures = StructureSettings(patterns={"ptv": (r"tumou?r bed",), "body": (r"body",)})
    case = load(folder, structures)
    assert case.structure_names == {Role.PTV: "Tumor Bed", Role.BODY: "BODY"}
    assert case.grid.spacing_mm == pytest.approx((1.074219, 1.074219, 3.0))
    assert case.ct_hu.shape == (22, 512, 512)
    # Expected PTV volume: polygon areas x slice spacing, from the file read independently.
    rs = pydicom.dcmread(DATA / "rtss.dcm")
    number = next(int(r.ROINumber) for r in rs.StructureSetROISequence if r.ROIName == "Tumor Bed")
    contours = next(c for c in rs.ROIContourSequence if int(c.ReferencedROINumber) == number).ContourSequence
    area = sum(_shoelace(np.asarray(c.ContourData, dtype=float).reshape(-1, 3)[:, :2]) for c in contours)
    expected_cc = area * 3.0 / 1000.0
    got_cc = case.masks[Role.PTV].sum() * case.grid.voxel_volume_cc
    assert got_cc == pytest.approx(expected_cc, rel=0.03)
    assert case.masks[Role.PTV].any(axis=(1, 2)).sum() == len(contours)
    # The tumour bed lies inside the body.
    assert not (case.masks[Role.PTV] & ~case.masks[Role.BODY]).sum() > 0.01 * case.masks[Role.PTV].sum()


@pytest.mark.parametrize("names", [("rtstruct.dcm", "CT_small.dcm"), ("rtstruct.dcm",), ("CT_small.dcm",)])
def test_pydicom_test_files_give_a_case_or_a_clear_input_error(
    tmp_path: Path, names: tuple[str, ...]
) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    for n in names:
        path = get_testdata_file(n)
        assert path is not None
        shutil.copy(path, folder / n)
    with pytest.raises(InputError) as err:
        load(folder)
    if len(names) == 2:
        assert "frame of reference" in str(err.value)


def test_rle_compressed_and_12_bit_slices_decode_like_pydicom(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    garbage = np.uint16(0xA000)  # bits above BitsStored that are not part of the value

    def to_12_bit(ds: Dataset) -> None:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | garbage).astype("<u2").tobytes()

    for p in spec.paths[:5]:
        edit(p, to_12_bit)
    for p in spec.paths[5:10]:
        edit(p, lambda ds: ds.compress(RLELossless, generate_instance_uid=False))
    case = load(folder)
    for k, p in enumerate(spec.paths[:10]):
        ds = pydicom.dcmread(p)
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(case.ct_hu[k], expected)
    np.testing.assert_array_equal(case.ct_hu, spec.hu().astype(np.float32))  # stored values were 0..1999


def _read_mha(path: Path) -> tuple[dict[str, str], NDArray[np.uint8]]:
    """A MetaImage (.mha, uncompressed uchar) as its header and [k, j, i] array."""
    raw = path.read_bytes()
    header: dict[str, str] = {}
    pos = 0
    while True:
        end = raw.index(b"\n", pos)
        key, value = (x.strip() for x in raw[pos:end].decode("ascii").split("=", 1))
        header[key] = value
        pos = end + 1
        if key == "ElementDataFile":
            break
    assert header["ElementType"] == "MET_UCHAR" and header.get("CompressedData", "False") == "False"
    dims = [int(x) for x in header["DimSize"].split()]
    return header, np.frombuffer(raw[pos:], dtype=np.uint8).reshape(dims[::-1])


@pytest.mark.external
def test_masks_agree_with_plastimatch(tmp_path: Path) -> None:
    # An independent rasteriser on an FFS series (flipped x, z stored decreasing). plastimatch
    # does not cut holes from separate inner contours, so the ring ROI is left out.
    plastimatch = require_tool("plastimatch")
    folder, _ = build(tmp_path, position="FFS")
    out = tmp_path / "masks"
    subprocess.run(
        [plastimatch, "convert", "--input", str(folder / "rs.dcm"), "--referenced-ct", str(folder / "ct"),
         "--output-prefix", str(out), "--prefix-format", "mha"],
        check=True, capture_output=True, timeout=120,
    )
    structures = StructureSettings(patterns={"ptv": (r"ptv_40",), "bladder": ("bladder",), "body": ("body",)})
    case = load(folder, structures)
    g = case.grid
    for name, role in (("PTV_40", Role.PTV), ("Bladder", Role.BLADDER), ("BODY", Role.BODY)):
        header, ref = _read_mha(out / f"{name}.mha")
        direction = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3)
        offset = np.array([float(v) for v in header["Offset"].split()])
        spacing = np.array([float(v) for v in header["ElementSpacing"].split()])
        k, j, i = np.indices(ref.shape)
        world = offset + (np.stack([i, j, k], -1).reshape(-1, 3) * spacing) @ direction.T
        idx = (world - np.array(g.origin_mm)) / np.array(g.spacing_mm)
        assert np.allclose(idx, np.rint(idx), atol=1e-3)
        ii, jj, kk = np.rint(idx).astype(int).T
        ours = case.masks[role][kk, jj, ii]
        theirs = ref.ravel() > 0
        assert theirs.sum() > 100
        assert np.count_nonzero(ours != theirs) <= 0.01 * theirs.sum(), name


# ---------------------------------------------------------------------------------------------
# The case checked against its structure set before planning (a wrong or partial case is refused)


@pytest.mark.parametrize("absent", ["RescaleIntercept", "RescaleSlope"])
def test_refuses_ct_without_rescale_attributes(tmp_path: Path, absent: str) -> None:
    """Both are Type 1: without them the stored values are not HU, and planning on them put a patient
    1.5 times too dense under the dose."""
    folder, spec = build(tmp_path)
    edit(spec.paths[4], lambda ds: delattr(ds, absent))
    with pytest.raises(InputError, match=rf"lacks {absent} \(Type 1 in the CT Image module\)") as err:
        load(folder)
    assert spec.sop_uids[4] in str(err.value)


def test_refuses_a_ct_missing_slices_the_structures_were_drawn_on(tmp_path: Path) -> None:
    """The top 8 of 20 slices never arrived: the rest is a complete, evenly spaced series, but the
    structure set references the missing images, so the case is not planned truncated."""
    folder, spec = build(tmp_path)
    top = np.argsort(spec.ipps[:, 2])[-8:]
    for s in top:
        spec.paths[s].unlink()
    with pytest.raises(InputError, match=r"references 20 CT images of which 8 were not received") as err:
        load(folder)
    assert "send the whole planning CT series" in str(err.value)


def test_refuses_ptv_contours_outside_a_truncated_ct(tmp_path: Path) -> None:
    """Without image references, a PTV reaching beyond the CT's slices is refused (not cut)."""
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    rois = [Roi("PTV", [(zz, circle(0.0, 0.0, 15.0)) for zz in [*z[-4:], z[-1] + 2.5, z[-1] + 5.0]])]
    write_rtstruct(folder / "rs.dcm", spec, rois, reference_series=False)
    with pytest.raises(InputError, match=r"PTV 'PTV' .*2 of 6 contours lie outside the CT's slices"):
        load(folder)


def test_refuses_ptv_contours_with_fewer_than_three_points(tmp_path: Path) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    line = np.array([[0.0, 0.0], [10.0, 0.0]])
    rois = [Roi("PTV", [(zz, circle(0.0, 0.0, 15.0)) for zz in z[4:12]] + [(z[8], line), (z[9], line)]),
            Roi("Bladder", [(z[3], square(0, 0, 5)), (z[4], line)])]
    write_rtstruct(folder / "rs.dcm", spec, rois)
    with pytest.raises(InputError, match=r"2 contours have fewer than 3 readable points.*Correct the PTV"):
        load(folder)


def test_oar_contour_with_fewer_than_three_points_is_a_warning(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    spec = make_ct()
    folder = tmp_path / "case"
    write_ct(spec, folder)
    z = slice_z(spec)
    rois = [Roi("PTV", [(zz, circle(0.0, 0.0, 15.0)) for zz in z[4:12]]),
            Roi("Bladder", [(z[3], square(0, 0, 5)), (z[4], np.array([[0.0, 0.0], [10.0, 0.0]]))])]
    write_rtstruct(folder / "rs.dcm", spec, rois)
    with caplog.at_level(logging.WARNING):
        case = load(folder)
    assert Role.BLADDER in case.masks
    assert any("1 contours with fewer than 3 readable points" in r.getMessage() for r in caplog.records)


def test_structure_set_without_referenced_frame_sequence_uses_its_rois_frame(tmp_path: Path) -> None:
    """ReferencedFrameOfReferenceSequence is Type 3; every ROI names its frame (Type 1)."""
    folder, spec = build(tmp_path)
    edit(folder / "rs.dcm", lambda ds: delattr(ds, "ReferencedFrameOfReferenceSequence"))
    case = load(folder)
    assert case.dicom is not None and case.dicom.ct_series_instance_uid == spec.series_uid


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), fill=st.sampled_from([0.0, 0.001, 0.05, 0.6]))
def test_mask_voxels_are_np_nonzero_read_inside_the_bounding_box(seed: int, fill: float) -> None:
    """The PTV's voxels (isocenter, field check) are found inside the mask's bounding box only: the same
    indices in the same order as ``np.nonzero`` over the whole mask, and the same box as the voxels span."""
    rng = np.random.default_rng(seed)
    mask = rng.random((int(rng.integers(1, 9)), int(rng.integers(1, 11)), int(rng.integers(1, 13)))) < fill
    got, want = mask_voxels(mask), np.nonzero(mask)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    box = mask_bbox(mask)
    if not mask.any():
        assert box is None and all(a.size == 0 for a in got)
    else:
        assert box is not None
        assert [(s.start, s.stop) for s in box] == [(int(a.min()), int(a.max()) + 1) for a in want]
        assert int(mask[box].sum()) == int(mask.sum())
