"""RT Dose writer and reader: geometry in every patient position, dciodvfy, plastimatch, UID links."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from appliance.dicom.common import length_violations
from appliance.dicom.rtdose import read_rtdose, write_rtdose
from appliance.dicom.rtplan import write_rtplan
from core.case import Case, Grid
from core.errors import ExportError
from core.machine import MachineModel
from tests.conftest import require_tool
from tests.test_rtplan import DATA, ORIENTATION, make_arc, write_source_case

#: A dose grid that differs from the CT grid (other origin, spacing and shape).
DOSE_GRID = Grid(origin_mm=(-28.0, -17.0, -13.5), spacing_mm=(4.0, 2.5, 3.0), shape=(5, 7, 9))
MARKER = (3, 1, 6)  # [k, j, i] of the hottest voxel


def _dose(seed: int = 0) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    dose = rng.uniform(0.0, 30.0, DOSE_GRID.shape)
    dose[0, 0, 0] = 0.0
    dose[MARKER] = 42.123456
    return dose


def _write(tmp_path: Path, position: str, dose: NDArray[np.float64] | None = None) -> tuple[Path, Case, str]:
    case = write_source_case(tmp_path / "src", position)
    path = tmp_path / "out" / "rtdose.dcm"
    plan_uid = "1.2.3.4.5"
    write_rtdose(path, dose_gy=_dose() if dose is None else dose, grid=DOSE_GRID, case=case,
                 plan_sop_instance_uid=plan_uid)
    return path, case, plan_uid


@pytest.mark.parametrize("position", sorted(ORIENTATION))
def test_round_trip_in_every_patient_position(tmp_path: Path, position: str) -> None:
    dose = _dose()
    path, _, _ = _write(tmp_path, position, dose)
    back, grid = read_rtdose(path)
    assert grid.shape == DOSE_GRID.shape
    np.testing.assert_allclose(grid.origin_mm, DOSE_GRID.origin_mm, atol=1e-9)
    np.testing.assert_allclose(grid.spacing_mm, DOSE_GRID.spacing_mm, atol=1e-12)
    # 32-bit quantisation: max dose over ~2^31 levels.
    np.testing.assert_allclose(back, dose, rtol=0, atol=dose.max() * 2.0**-30)
    assert back[0, 0, 0] == 0.0


@pytest.mark.parametrize("position", sorted(ORIENTATION))
def test_hottest_voxel_is_where_the_file_says(tmp_path: Path, position: str) -> None:
    """Locate the marker from the raw attributes with the standard's formulas (no reader code)."""
    path, _, _ = _write(tmp_path, position)
    ds = pydicom.dcmread(path)
    assert list(map(float, ds.ImageOrientationPatient)) == list(ORIENTATION[position])
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    f, r, c = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
    row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
    col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) > 0)
    where = (np.array([float(v) for v in ds.ImagePositionPatient]) + c * col_spacing * row_dir
             + r * row_spacing * col_dir + offsets[f] * normal)
    x, y, z = DOSE_GRID.axes_mm()
    k, j, i = MARKER
    np.testing.assert_allclose(where, (x[i], y[j], z[k]), atol=1e-9)
    assert abs(pixels[f, r, c] * float(ds.DoseGridScaling) - 42.123456) < 1e-6


def test_attributes_and_value_lengths(tmp_path: Path) -> None:
    path, case, plan_uid = _write(tmp_path, "HFS")
    ds = pydicom.dcmread(path)
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (32, 32, 31, 0)
    assert ds.NumberOfFrames == 5 and ds.FrameIncrementPointer == pydicom.tag.Tag("GridFrameOffsetVector")
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan_uid
    assert case.dicom is not None and ds.FrameOfReferenceUID == case.dicom.frame_of_reference_uid
    assert ds.PatientID == "PHANTOM01"
    assert length_violations(ds) == []


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_dciodvfy_reports_no_errors(tmp_path: Path, position: str) -> None:
    dciodvfy = require_tool("dciodvfy")
    dcmcrle = require_tool("dcmcrle")
    path, _, _ = _write(tmp_path, position)
    rle = tmp_path / "rle.dcm"  # dciodvfy aborts on uncompressed 32-bit pixel data
    subprocess.run([dcmcrle, str(path), str(rle)], check=True, capture_output=True, timeout=60)
    proc = subprocess.run([dciodvfy, str(rle)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert [line for line in out.splitlines() if line.startswith("Error")] == [], out
    assert proc.returncode == 0, out


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP"])
def test_plastimatch_reads_the_same_dose(tmp_path: Path, position: str) -> None:
    """plastimatch (an independent reader) finds the same voxels at the same positions."""
    plastimatch = require_tool("plastimatch")
    path, _, _ = _write(tmp_path, position)
    mha = tmp_path / "dose.mha"
    proc = subprocess.run([plastimatch, "convert", "--input", str(path), "--output-dose-img", str(mha),
                           "--output-type", "float"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = mha.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    assert header["DimSize"].split() == ["9", "7", "5"] and header["ElementType"] == "MET_FLOAT"
    matrix = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3)
    signs = np.diag(matrix).astype(int)
    np.testing.assert_array_equal(matrix, np.diag(signs))  # axial: a diagonal of +/-1
    spacing = np.array([float(v) for v in header["ElementSpacing"].split()])
    np.testing.assert_allclose(spacing, DOSE_GRID.spacing_mm, atol=1e-6)
    values = np.frombuffer(raw[end:], dtype="<f4").reshape(DOSE_GRID.shape)
    canonical = values[:: signs[2], :: signs[1], :: signs[0]]
    offset = np.array([float(v) for v in header["Offset"].split()])
    origin = np.where(signs > 0, offset, offset - (np.array([9, 7, 5]) - 1) * spacing)
    np.testing.assert_allclose(origin, DOSE_GRID.origin_mm, atol=1e-4)
    np.testing.assert_allclose(canonical, _dose(), rtol=1e-6, atol=1e-5)


def test_uids_link_dose_plan_structure_set_and_ct(tmp_path: Path) -> None:
    case = write_source_case(tmp_path / "src", "HFS")
    assert case.dicom is not None
    machine = MachineModel()
    plan_path, dose_path = tmp_path / "rtplan.dcm", tmp_path / "rtdose.dcm"
    plan_uid = write_rtplan(plan_path, sequence=make_arc(machine, n_sectors=6), machine=machine, case=case,
                            isocenter_mm=case.ptv_centroid_mm(), fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)
    dose_uid = write_rtdose(dose_path, dose_gy=_dose(), grid=DOSE_GRID, case=case, plan_sop_instance_uid=plan_uid)
    plan, dose = pydicom.dcmread(plan_path), pydicom.dcmread(dose_path)
    rtss, ct = pydicom.dcmread(case.dicom.rtstruct_path), pydicom.dcmread(case.dicom.source_ct_path)
    assert dose.SOPInstanceUID == dose_uid and plan.SOPInstanceUID == plan_uid
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPClassUID == plan.SOPClassUID
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rtss.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPClassUID == rtss.SOPClassUID
    assert {dose.FrameOfReferenceUID, plan.FrameOfReferenceUID, rtss.FrameOfReferenceUID} == {ct.FrameOfReferenceUID}
    assert {dose.StudyInstanceUID, plan.StudyInstanceUID, rtss.StudyInstanceUID} == {ct.StudyInstanceUID}
    assert len({dose.SeriesInstanceUID, plan.SeriesInstanceUID, ct.SeriesInstanceUID}) == 3


def test_reads_the_dicompyler_example_dose() -> None:
    raw = pydicom.dcmread(DATA / "rtdose.dcm")
    dose, grid = read_rtdose(DATA / "rtdose.dcm")
    assert grid.shape == (int(raw.NumberOfFrames), raw.Rows, raw.Columns)
    np.testing.assert_allclose(grid.origin_mm, [float(v) for v in raw.ImagePositionPatient])
    assert grid.spacing_mm == (2.5, 2.5, 3.0)
    assert dose.max() == pytest.approx(float(raw.pixel_array.max()) * float(raw.DoseGridScaling))


@pytest.mark.parametrize(
    ("change", "message"),
    [("negative", "negative"), ("nan", "NaN"), ("shape", "shape"), ("oblique", "not axial"), ("uid", "UID")],
)
def test_refuses_bad_input(tmp_path: Path, change: str, message: str) -> None:
    case = write_source_case(tmp_path / "src", "HFS")
    dose = _dose()
    plan_uid = "1.2.3"
    if change == "negative":
        dose[1, 1, 1] = -0.5
    elif change == "nan":
        dose[1, 1, 1] = np.nan
    elif change == "shape":
        dose = dose[:, :, :4]
    elif change == "oblique":
        assert case.dicom is not None
        tilted = dataclasses.replace(case.dicom, image_orientation=(1.0, 0.0, 0.0, 0.0, 0.8, 0.6))
        case = dataclasses.replace(case, dicom=tilted)
    elif change == "uid":
        plan_uid = "1.2.03.x"
    out = tmp_path / "rtdose.dcm"
    with pytest.raises(ExportError, match=message):
        write_rtdose(out, dose_gy=dose, grid=DOSE_GRID, case=case, plan_sop_instance_uid=plan_uid)
    assert not out.exists()


def test_reads_the_absolute_offset_form(tmp_path: Path) -> None:
    """Some systems write GridFrameOffsetVector as z coordinates (first value = z of the IPP)."""
    path, _, _ = _write(tmp_path, "HFS")
    ds = pydicom.dcmread(path)
    z0 = float(ds.ImagePositionPatient[2])
    ds.GridFrameOffsetVector = [str(z0 + float(v)) for v in ds.GridFrameOffsetVector]
    absolute = tmp_path / "absolute.dcm"
    ds.save_as(absolute)
    dose, grid = read_rtdose(absolute)
    assert grid == read_rtdose(path)[1]
    np.testing.assert_allclose(dose, _dose(), atol=_dose().max() * 2.0**-30)


def test_logs_name_uids_but_never_the_patient(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    case = write_source_case(tmp_path / "src", "HFS")
    machine = MachineModel()
    plan_uid = write_rtplan(tmp_path / "p.dcm", sequence=make_arc(machine, n_sectors=4), machine=machine,
                            case=case, isocenter_mm=(0.0, 0.0, 0.0), fractions=5, rx_gy=40.0,
                            dose_rate_mu_min=600.0)
    write_rtdose(tmp_path / "d.dcm", dose_gy=_dose(), grid=DOSE_GRID, case=case, plan_sop_instance_uid=plan_uid)
    assert plan_uid in caplog.text
    assert "Phantom" not in caplog.text and "PHANTOM01" not in caplog.text
