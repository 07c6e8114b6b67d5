"""RT Plan writer and reader: round trip, encoding rules, dciodvfy, a clinical plan, pymedphys (DS
formatting itself: test_dicom_common)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from appliance.dicom.common import length_violations
from appliance.dicom.rtplan import MODALITY, ApprovalStatus, PlanGeometry, PlanIntent, write_rtplan
from appliance.dicom.rtplan_beam import (
    BeamType,
    DeviceType,
    RadiationType,
    RotationDirectionCode,
    TreatmentDeliveryType,
)
from appliance.dicom.rtplan_reader import arc_sequence_from_beam, read_rtplan
from core.case import Case, DicomRefs, Grid, PatientPosition, Role
from core.errors import ExportError
from core.machine import ArcSpec, MachineModel, RotationDirection
from tests.conftest import require_tool

DATA = Path(__file__).parent / "data" / "dicompyler_example"

#: ImageOrientationPatient of an axial CT per patient position (rows along x, columns along y).
ORIENTATION: dict[str, tuple[float, float, float, float, float, float]] = {
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}


# --------------------------------------------------------------------------------------------
# Source data: a tiny CT series and RT Structure Set written with pydicom, and a Case on them.
# --------------------------------------------------------------------------------------------


def _save(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def write_source_case(folder: Path, position: str = "HFS", *, nx: int = 12, ny: int = 10, nz: int = 6) -> Case:
    """Write a small CT series (nz slices of ny x nx) and an RTSTRUCT with a PTV; return the Case.

    The canonical grid has origin (-30, -20, -15) mm and spacing (5, 4, 3) mm whatever the
    patient position; the CT files are written in the orientation of ``position``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = ORIENTATION[position]
    grid = Grid(origin_mm=(-30.0, -20.0, -15.0), spacing_mm=(5.0, 4.0, 3.0), shape=(nz, ny, nx))
    x, y, z = grid.axes_mm()
    sx, sy = int(iop[0]), int(iop[4])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    ct_paths = []
    for k in range(nz):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "PHANTOM01"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "S1"
        ds.AccessionNumber = "A123"
        ds.StudyDescription = "Prostate planning"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = position
        ds.Manufacturer = "Phantom maker"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [x[0] if sx > 0 else x[-1], y[0] if sy > 0 else y[-1], z[k]]
        ds.PixelSpacing = [grid.spacing_mm[1], grid.spacing_mm[0]]
        ds.SliceThickness = grid.spacing_mm[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.KVP = 120
        ds.PixelData = np.zeros((ny, nx), dtype="<i2").tobytes()
        path = folder / f"ct_{k:03d}.dcm"
        _save(ds, path)
        ct_paths.append(path)

    rs = Dataset()
    rs.SOPClassUID = RTStructureSetStorage
    rs.SOPInstanceUID = generate_uid()
    rs.Modality = "RTSTRUCT"
    rs.StudyInstanceUID = study
    rs.SeriesInstanceUID = generate_uid()
    rs.FrameOfReferenceUID = frame
    rs.StructureSetLabel = "RS"
    rois = []
    for number, name in ((1, "BODY"), (2, "PTV_40")):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
    rs.StructureSetROISequence = Sequence(rois)
    rs_path = folder / "rtss.dcm"
    _save(rs, rs_path)

    ptv = np.zeros(grid.shape, dtype=bool)
    ptv[2:4, 3:6, 4:8] = True
    return Case(
        case_id="phantom",
        ct_hu=np.zeros(grid.shape, dtype=np.float32),
        grid=grid,
        masks={Role.PTV: ptv},
        structure_names={Role.PTV: "PTV_40"},
        patient_position=PatientPosition(position),
        dicom=DicomRefs(
            study_instance_uid=study,
            frame_of_reference_uid=frame,
            ct_series_instance_uid=series,
            rtstruct_sop_instance_uid=str(rs.SOPInstanceUID),
            source_ct_path=str(ct_paths[0]),
            rtstruct_path=str(rs_path),
            image_orientation=iop,
        ),
    )


@dataclass(frozen=True)
class SimpleArc:
    """An arc with the fields of ``sequencing.sequencer.ArcSequence`` (no validation of its own)."""

    gantry_deg: NDArray[np.float64]
    leaves_mm: NDArray[np.float64]
    jaws_mm: NDArray[np.float64]
    cumulative_mu: NDArray[np.float64]
    collimator_deg: float
    direction: RotationDirection

    @property
    def total_mu(self) -> float:
        return float(self.cumulative_mu[-1])


def make_arc(machine: MachineModel, seed: int = 0, n_sectors: int = 180) -> SimpleArc:
    """A plausible VMAT arc: sliding leaves, jaws that change twice, irregular MU per sector."""
    rng = np.random.default_rng(seed)
    arc = ArcSpec(n_sectors=n_sectors)
    gantry = arc.control_point_angles_deg()
    n_cp = gantry.size
    n_pairs = machine.n_leaf_pairs
    t = np.linspace(0, 4 * np.pi, n_cp)[:, None]
    rows = np.arange(n_pairs)[None, :]
    centre = 20 * np.sin(t + rows / 7.0) + rng.uniform(-1, 1, (n_cp, n_pairs))
    half = 5 + 15 * rng.random((n_cp, n_pairs)) ** 2 + 1 / 3
    leaves = np.stack([centre - half, centre + half], axis=-1)
    jaws = np.tile([-60.123456789, 55.5, -40.0, 45.25], (n_cp, 1))
    jaws[60:, 0] = -70.0
    jaws[120:, 3] = 50.0 + 1e-7
    seg = rng.gamma(2.0, 0.5, n_cp - 1)
    seg[n_sectors // 2] = 0.0  # a sector without MU is allowed
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    return SimpleArc(gantry, leaves, jaws, cum, 30.0, RotationDirection.CW)


def write_plan(tmp_path: Path, position: str = "HFS", seed: int = 0) -> tuple[Path, str, SimpleArc, Case]:
    case = write_source_case(tmp_path / "src", position)
    machine = MachineModel()
    seq = make_arc(machine, seed)
    path = tmp_path / "out" / "rtplan.dcm"
    uid = write_rtplan(
        path, sequence=seq, machine=machine, case=case, isocenter_mm=(1.25, -3.5, 0.123456789012345),
        fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0,
    )
    return path, uid, seq, case


# --------------------------------------------------------------------------------------------
# Writer <-> reader
# --------------------------------------------------------------------------------------------


def test_round_trip_every_control_point(tmp_path: Path) -> None:
    path, uid, seq, case = write_plan(tmp_path)
    plan = read_rtplan(path)
    refs = case.dicom
    assert refs is not None
    assert plan.sop_instance_uid == uid
    assert plan.study_instance_uid == refs.study_instance_uid
    assert plan.frame_of_reference_uid == refs.frame_of_reference_uid
    assert plan.structure_set_uid == refs.rtstruct_sop_instance_uid
    assert plan.approval_status == ApprovalStatus.UNAPPROVED
    assert plan.fractions_planned == 5
    assert plan.patient_position == "HFS"
    assert len(plan.beams) == 1
    beam = plan.beams[0]
    assert beam.n_control_points == seq.gantry_deg.size == 181
    np.testing.assert_allclose(beam.gantry_deg, seq.gantry_deg, rtol=0, atol=1e-9)
    assert beam.leaves_mm is not None
    np.testing.assert_allclose(beam.leaves_mm, seq.leaves_mm, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(beam.jaws_mm, seq.jaws_mm, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(beam.cumulative_mu, seq.cumulative_mu, rtol=1e-12, atol=1e-12)
    assert math.isclose(plan.total_mu, seq.total_mu, rel_tol=1e-14)
    assert set(beam.collimator_deg) == {30.0}
    assert beam.gantry_direction == (RotationDirectionCode.CW,) * 180 + (RotationDirectionCode.NONE,)
    assert beam.is_arc and beam.beam_type == BeamType.DYNAMIC
    assert beam.isocenter_mm is not None
    np.testing.assert_allclose(beam.isocenter_mm, (1.25, -3.5, 0.123456789012345), atol=1e-12)
    assert (beam.energy_mv, beam.dose_rate_mu_min, beam.sad_mm, beam.machine_name) == (6.0, 600.0, 1000.0, "TrueBeam")
    np.testing.assert_array_equal(beam.leaf_boundaries_mm, MachineModel().leaf_boundaries_mm)


def test_control_point_encoding_and_research_marking(tmp_path: Path) -> None:
    path, _, seq, case = write_plan(tmp_path)
    ds = pydicom.dcmread(path)
    ct = pydicom.dcmread(case.dicom.source_ct_path if case.dicom else "")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyID",
                    "AccessionNumber", "FrameOfReferenceUID", "StudyDate"):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.Modality == MODALITY == "RTPLAN"
    assert ds.ApprovalStatus == ApprovalStatus.UNAPPROVED == "UNAPPROVED"
    assert ds.PlanIntent == PlanIntent.RESEARCH == "RESEARCH"
    assert "not clinically approved" in ds.RTPlanDescription.lower()
    assert ds.RTPlanGeometry == PlanGeometry.PATIENT == "PATIENT"
    assert ds.DoseReferenceSequence[0].ReferencedROINumber == 2  # PTV_40 in the structure set
    assert float(ds.DoseReferenceSequence[0].TargetPrescriptionDose) == 40.0
    fg = ds.FractionGroupSequence[0]
    assert (fg.NumberOfBeams, fg.NumberOfBrachyApplicationSetups, fg.NumberOfFractionsPlanned) == (1, 0, 5)
    beam = ds.BeamSequence[0]
    assert (beam.BeamType, beam.RadiationType, beam.TreatmentDeliveryType) == ("DYNAMIC", "PHOTON", "TREATMENT")
    assert (BeamType.DYNAMIC, RadiationType.PHOTON, TreatmentDeliveryType.TREATMENT) == ("DYNAMIC", "PHOTON", "TREATMENT")
    assert [d.RTBeamLimitingDeviceType for d in beam.BeamLimitingDeviceSequence] == ["ASYMX", "ASYMY", "MLCX"]
    assert [DeviceType.ASYMX, DeviceType.ASYMY, DeviceType.MLCX] == ["ASYMX", "ASYMY", "MLCX"]
    assert len(beam.BeamLimitingDeviceSequence[2].LeafPositionBoundaries) == 61
    cps = beam.ControlPointSequence
    first = cps[0]
    for keyword in ("NominalBeamEnergy", "DoseRateSet", "BeamLimitingDeviceAngle", "PatientSupportAngle",
                    "TableTopEccentricAngle", "IsocenterPosition"):
        assert keyword in first, keyword
    assert first.CumulativeMetersetWeight == 0 and cps[-1].CumulativeMetersetWeight == 1
    assert first.GantryRotationDirection == "CW" and cps[-1].GantryRotationDirection == "NONE"
    # Jaws appear after control point 0 only where they change (X1 at 60, Y2 at 120).
    jaw_cps = [cp.ControlPointIndex for cp in cps[1:]
               if any(d.RTBeamLimitingDeviceType != "MLCX" for d in cp.BeamLimitingDevicePositionSequence)]
    assert jaw_cps == [60, 120]
    assert all("NominalBeamEnergy" not in cp and "IsocenterPosition" not in cp for cp in cps[1:])
    mlc = np.array([float(v) for v in cps[5].BeamLimitingDevicePositionSequence[-1].LeafJawPositions])
    np.testing.assert_allclose(mlc[:60], seq.leaves_mm[5, :, 0], atol=1e-9)  # bank A first
    np.testing.assert_allclose(mlc[60:], seq.leaves_mm[5, :, 1], atol=1e-9)


def test_every_value_fits_its_vr(tmp_path: Path) -> None:
    path, *_ = write_plan(tmp_path)
    assert length_violations(pydicom.dcmread(path)) == []


def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    tool = require_tool("dciodvfy")
    path, *_ = write_plan(tmp_path, "FFS")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert errors == [], out
    assert proc.returncode == 0, out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("decreasing", "decreases"),
        ("crossed", "collide"),
        ("shape", "shape"),
        ("nan", "NaN"),
        ("jaws", "X1 <= X2"),
    ],
)
def test_rejects_bad_sequences(tmp_path: Path, change: str, message: str) -> None:
    case = write_source_case(tmp_path / "src")
    machine = MachineModel()
    seq = make_arc(machine, n_sectors=8)
    leaves, jaws, cum = seq.leaves_mm.copy(), seq.jaws_mm.copy(), seq.cumulative_mu.copy()
    if change == "decreasing":
        cum[3] = cum[4] + 0.1
    elif change == "crossed":
        leaves[2, 30] = [10.0, 9.0]
    elif change == "shape":
        leaves = leaves[:, :40]
    elif change == "nan":
        leaves[1, 1, 1] = np.nan
    elif change == "jaws":
        jaws[0, :2] = [10.0, -10.0]
    bad = SimpleArc(seq.gantry_deg, leaves, jaws, cum, seq.collimator_deg, seq.direction)
    out = tmp_path / "rtplan.dcm"
    with pytest.raises(ExportError, match=message):
        write_rtplan(out, sequence=bad, machine=machine, case=case, isocenter_mm=(0.0, 0.0, 0.0),
                     fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)
    assert not out.exists()


def test_rejects_long_label_and_case_without_dicom(tmp_path: Path) -> None:
    case = write_source_case(tmp_path / "src")
    machine = MachineModel()
    seq = make_arc(machine, n_sectors=4)
    with pytest.raises(ExportError, match="RTPlanLabel"):
        write_rtplan(tmp_path / "p.dcm", sequence=seq, machine=machine, case=case, isocenter_mm=(0, 0, 0),
                     plan_label="A label that is far too long", fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)
    bare = Case(case_id="bare", ct_hu=case.ct_hu, grid=case.grid, masks=case.masks)
    with pytest.raises(ExportError, match="no DICOM references"):
        write_rtplan(tmp_path / "p.dcm", sequence=seq, machine=machine, case=bare, isocenter_mm=(0, 0, 0),
                     fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)


def _rename_devices(ds: Dataset, names: dict[str, str]) -> None:
    """Rename beam limiting devices in a plan's beams and control points (``names``: old -> new)."""
    for beam in ds.BeamSequence:
        items = [*beam.BeamLimitingDeviceSequence,
                 *(d for cp in beam.ControlPointSequence for d in cp.get("BeamLimitingDevicePositionSequence", []))]
        for d in items:
            d.RTBeamLimitingDeviceType = names.get(d.RTBeamLimitingDeviceType, d.RTBeamLimitingDeviceType)


def test_reader_takes_every_device_keyword_and_skips_setup_beams(tmp_path: Path) -> None:
    path, _, seq, _ = write_plan(tmp_path)
    ds = pydicom.dcmread(path)
    _rename_devices(ds, {DeviceType.ASYMX: DeviceType.X, DeviceType.ASYMY: DeviceType.Y,
                         DeviceType.MLCX: DeviceType.MLCY})
    setup = Dataset()
    setup.update(ds.BeamSequence[0])
    setup.BeamNumber = 2
    setup.TreatmentDeliveryType = "SETUP"
    ds.BeamSequence.append(setup)
    ref = Dataset()
    ref.update(ds.FractionGroupSequence[0].ReferencedBeamSequence[0])
    ref.ReferencedBeamNumber = 2
    ds.FractionGroupSequence[0].ReferencedBeamSequence.append(ref)  # referenced, yet no treatment beam
    ds.save_as(tmp_path / "renamed.dcm")
    plan = read_rtplan(tmp_path / "renamed.dcm")
    assert [b.beam_number for b in plan.beams] == [1]
    beam = plan.beams[0]
    np.testing.assert_allclose(beam.jaws_mm, seq.jaws_mm, rtol=1e-12, atol=1e-9)
    assert beam.leaves_mm is not None
    np.testing.assert_allclose(beam.leaves_mm, seq.leaves_mm, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(beam.leaf_boundaries_mm, MachineModel().leaf_boundaries_mm)


def test_reader_names_the_control_point_of_a_bad_device(tmp_path: Path) -> None:
    path, *_ = write_plan(tmp_path)
    ds = pydicom.dcmread(path)
    cp = ds.BeamSequence[0].ControlPointSequence[0]
    cp.BeamLimitingDevicePositionSequence[0].LeafJawPositions = ["-10", "0", "10"]
    ds.save_as(tmp_path / "bad_jaw.dcm")
    with pytest.raises(ExportError, match=r"beam 1 control point 0: ASYMX has 3 positions, expected 2"):
        read_rtplan(tmp_path / "bad_jaw.dcm")
    ds = pydicom.dcmread(path)
    ds.BeamSequence[0].ControlPointSequence[3].BeamLimitingDevicePositionSequence[-1].LeafJawPositions = ["0"] * 4
    ds.save_as(tmp_path / "bad_mlc.dcm")
    with pytest.raises(ExportError, match=r"beam 1 control point 3: MLCX has 4 positions, expected 120"):
        read_rtplan(tmp_path / "bad_mlc.dcm")


def test_reader_refuses_a_beam_that_does_not_rotate(tmp_path: Path) -> None:
    path, *_ = write_plan(tmp_path)
    ds = pydicom.dcmread(path)
    for cp in ds.BeamSequence[0].ControlPointSequence:
        cp.GantryRotationDirection = RotationDirectionCode.NONE
    ds.save_as(tmp_path / "still.dcm")
    beam = read_rtplan(tmp_path / "still.dcm").beams[0]
    assert not beam.is_arc
    with pytest.raises(ExportError, match=r"is not a single-direction arc \(directions \['NONE'\]\)"):
        arc_sequence_from_beam(beam)


def test_arc_sequence_round_trip_gives_the_same_fluence(tmp_path: Path) -> None:
    sequencer = pytest.importorskip("sequencing.sequencer")
    fluence_mod = pytest.importorskip("sequencing.fluence")
    machine = MachineModel()
    arc = make_arc(machine, seed=3)
    original = sequencer.ArcSequence(arc.gantry_deg, arc.leaves_mm, arc.jaws_mm, arc.cumulative_mu,
                                     arc.collimator_deg, arc.direction)
    case = write_source_case(tmp_path / "src")
    path = tmp_path / "rtplan.dcm"
    write_rtplan(path, sequence=original, machine=machine, case=case, isocenter_mm=(0, 0, 0),
                 fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)
    back = arc_sequence_from_beam(read_rtplan(path).beams[0])
    assert back.direction is RotationDirection.CW and back.collimator_deg == 30.0
    f0 = fluence_mod.fluence_from_sequence(original, machine, substeps=2)
    f1 = fluence_mod.fluence_from_sequence(back, machine, substeps=2)
    assert f0.shape == (180, 40, 40) and f0.sum() > 0
    np.testing.assert_allclose(f1, f0, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# A clinical export: the dicompyler-core example (Varian sliding-window IMRT, 4 beams)
# --------------------------------------------------------------------------------------------


def test_reads_the_dicompyler_example_plan() -> None:
    raw = pydicom.dcmread(DATA / "rtplan.dcm")
    plan = read_rtplan(DATA / "rtplan.dcm")
    metersets = {int(r.ReferencedBeamNumber): float(r.BeamMeterset)
                 for r in raw.FractionGroupSequence[0].ReferencedBeamSequence}
    assert [b.beam_number for b in plan.beams] == [int(b.BeamNumber) for b in raw.BeamSequence]
    assert math.isclose(plan.total_mu, sum(metersets.values()), rel_tol=1e-12)
    assert plan.fractions_planned == int(raw.FractionGroupSequence[0].NumberOfFractionsPlanned)
    for beam, raw_beam in zip(plan.beams, raw.BeamSequence):
        assert math.isclose(beam.cumulative_mu[-1], metersets[beam.beam_number], rel_tol=1e-9)
        assert np.all(np.diff(beam.cumulative_mu) >= 0)
        assert not beam.is_arc
        # Gantry and jaws only at control point 0: carried forward to every control point.
        assert np.all(beam.gantry_deg == float(raw_beam.ControlPointSequence[0].GantryAngle))
        assert not np.isnan(beam.jaws_mm).any()
        np.testing.assert_array_equal(beam.jaws_mm, np.broadcast_to(beam.jaws_mm[0], beam.jaws_mm.shape))
        assert beam.leaves_mm is not None and beam.leaves_mm.shape == (beam.n_control_points, 60, 2)
        assert np.all(beam.leaves_mm[..., 0] <= beam.leaves_mm[..., 1])
        last = raw_beam.ControlPointSequence[-1]
        mlc = next(d for d in last.BeamLimitingDevicePositionSequence if d.RTBeamLimitingDeviceType == "MLCX")
        np.testing.assert_array_equal(beam.leaves_mm[-1, :, 1], [float(v) for v in mlc.LeafJawPositions[60:]])
    with pytest.raises(ExportError, match="single-direction arc"):
        arc_sequence_from_beam(plan.beams[0])


def test_reader_refuses_a_dose_file() -> None:
    with pytest.raises(ExportError, match="not an RT Plan"):
        read_rtplan(DATA / "rtdose.dcm")


# --------------------------------------------------------------------------------------------
# pymedphys, an independent parser (in its own environment unless installed here)
# --------------------------------------------------------------------------------------------

_PMP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pydicom
    from pymedphys import Delivery
    d = Delivery.from_dicom(pydicom.dcmread(sys.argv[1]))
    print(json.dumps({"mu": np.asarray(d.mu, float).tolist(), "gantry": np.asarray(d.gantry, float).tolist(),
                      "mlc": np.asarray(d.mlc, float).tolist()}))
    """
)


@pytest.fixture(scope="session")
def pymedphys_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python that can import pymedphys: this one, or a virtual environment made for the tests."""
    check = "import pymedphys, pydicom, numpy"
    if subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0:
        return sys.executable
    venv = Path(os.environ.get("AIRT_PYMEDPHYS_VENV", "/tmp/pmp-venv"))
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0:
        return str(python)
    base = shutil.which("python3")
    if base is None:
        pytest.skip("no python3 to make a pymedphys environment")
    made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "pymedphys==0.41.0", "pydicom", "numpy"],
        capture_output=True, text=True, timeout=600,
    ) if made.returncode == 0 else made
    if pip.returncode != 0:
        pytest.skip(f"cannot install pymedphys into {venv} (offline?): {pip.stderr.strip()[-300:]}")
    return str(python)


@pytest.mark.slow
def test_pymedphys_reads_our_plan(tmp_path: Path, pymedphys_python: str) -> None:
    path, _, seq, _ = write_plan(tmp_path, seed=7)
    ds = pydicom.dcmread(path)
    # pymedphys handles exactly MLCX + ASYMY with the jaws at every control point: adapt a copy.
    beam = ds.BeamSequence[0]
    beam.BeamLimitingDeviceSequence = Sequence(
        [d for d in beam.BeamLimitingDeviceSequence if d.RTBeamLimitingDeviceType != "ASYMX"])
    y_jaws = None
    for cp in beam.ControlPointSequence:
        items = [d for d in cp.BeamLimitingDevicePositionSequence if d.RTBeamLimitingDeviceType != "ASYMX"]
        found = [d for d in items if d.RTBeamLimitingDeviceType == "ASYMY"]
        if found:
            y_jaws = found[0]
        else:
            copy = Dataset()
            copy.RTBeamLimitingDeviceType = "ASYMY"
            copy.LeafJawPositions = y_jaws.LeafJawPositions if y_jaws is not None else None
            items.insert(0, copy)
        cp.BeamLimitingDevicePositionSequence = Sequence(items)
    adapted = tmp_path / "for_pymedphys.dcm"
    ds.save_as(adapted)
    proc = subprocess.run([pymedphys_python, "-c", _PMP_SCRIPT, str(adapted)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    mu = np.array(result["mu"])
    np.testing.assert_allclose(mu, seq.cumulative_mu, rtol=1e-9, atol=1e-9)
    assert math.isclose(mu[-1], seq.total_mu, rel_tol=1e-12)
    # pymedphys gives bipolar angles (-180, 180]; compare on the circle.
    diff = (np.array(result["gantry"]) - seq.gantry_deg + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(diff, 0.0, atol=1e-9)
    # Its MLC convention: leaf pairs in reverse order, [..., 0] = bank B, [..., 1] = -bank A.
    mlc = np.array(result["mlc"])
    assert mlc.shape == (181, 60, 2)
    np.testing.assert_allclose(mlc[:, ::-1, 0], seq.leaves_mm[..., 1], atol=1e-9)
    np.testing.assert_allclose(-mlc[:, ::-1, 1], seq.leaves_mm[..., 0], atol=1e-9)
