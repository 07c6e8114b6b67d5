"""DICOM RT Plan writer for a single-arc VMAT plan, built from scratch with pydicom.

The plan holds the modules of the RT Plan IOD (PS3.3 A.20): SOP Common, Patient, General
Study, RT Series, Frame of Reference, General Equipment, RT General Plan, RT Prescription,
RT Fraction Scheme, RT Patient Setup, RT Beams and Approval. Patient, study and frame of
reference attributes are copied from the planning CT. The plan is research output: its
PlanIntent is RESEARCH, its name and description say it is not clinically approved and its
ApprovalStatus is always UNAPPROVED.

Control points (PS3.3 C.8.8.14): the first carries every attribute (energy, dose rate, jaws,
MLC, collimator, couch, isocenter); later ones carry the gantry angle, the rotation direction,
the MLC, the jaws when they changed, and the cumulative meterset weight. The weights are the
cumulative MU divided by the total MU (0 at the first control point, 1 at the last). The
rotation direction describes the segment *following* a control point (C.8.8.14.5), so the
last control point, which starts no segment, carries ``NONE``.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RTPlanStorage, RTStructureSetStorage

from appliance.dicom_common import (
    RESEARCH_NOTE,
    copy_patient_study,
    format_ds,
    format_ds_list,
    new_uid,
    read_source,
    save_dataset,
    set_equipment,
    set_instance_creation,
)
from appliance.uids import check_written_uid
from core.case import Case, Role
from core.errors import ExportError
from core.machine import MachineModel

logger = logging.getLogger(__name__)

#: Tolerance on positions and angles when comparing control points, mm or degrees.
_TOL = 1e-6


class BeamType(enum.StrEnum):
    """DICOM BeamType (300A,00C4)."""

    STATIC = "STATIC"
    DYNAMIC = "DYNAMIC"


class RadiationType(enum.StrEnum):
    """DICOM RadiationType (300A,00C6) values this writer uses."""

    PHOTON = "PHOTON"


class TreatmentDeliveryType(enum.StrEnum):
    """DICOM TreatmentDeliveryType (300A,00CE) values this writer uses."""

    TREATMENT = "TREATMENT"


class RotationDirectionCode(enum.StrEnum):
    """DICOM rotation directions (gantry, collimator, couch): CW, CC or NONE ("CCW" is wrong)."""

    CW = "CW"
    CC = "CC"
    NONE = "NONE"


class ApprovalStatus(enum.StrEnum):
    """DICOM ApprovalStatus (300E,0002); this writer only ever writes UNAPPROVED."""

    APPROVED = "APPROVED"
    UNAPPROVED = "UNAPPROVED"
    REJECTED = "REJECTED"


class PlanGeometry(enum.StrEnum):
    """DICOM RTPlanGeometry (300A,000C)."""

    PATIENT = "PATIENT"
    TREATMENT_DEVICE = "TREATMENT_DEVICE"


class PlanIntent(enum.StrEnum):
    """DICOM PlanIntent (300A,000A) values this writer uses."""

    RESEARCH = "RESEARCH"


class DeviceType(enum.StrEnum):
    """DICOM RTBeamLimitingDeviceType (300A,00B8) values this writer uses."""

    ASYMX = "ASYMX"
    ASYMY = "ASYMY"
    MLCX = "MLCX"


class ArcSequenceLike(Protocol):
    """What the writer needs from a sequenced arc (``sequencing.sequencer.ArcSequence``).

    Attributes
    ----------
    gantry_deg
        (n_cp,) control-point gantry angles, degrees in [0, 360).
    leaves_mm
        (n_cp, n_pairs, 2) leaf positions at the isocenter plane, mm: ``[..., 0]`` bank A
        (X1 side), ``[..., 1]`` bank B, bank A <= bank B.
    jaws_mm
        (n_cp, 4) X1, X2, Y1, Y2 jaw positions, mm (X1 <= X2, Y1 <= Y2).
    cumulative_mu
        (n_cp,) MU delivered up to each control point, per fraction: 0 at the first,
        non-decreasing, the total at the last.
    collimator_deg
        Collimator angle, degrees in [0, 360).
    direction
        Gantry rotation direction (a str enum whose value is "CW" or "CC").
    total_mu
        MU per fraction of the arc (> 0).
    """

    @property
    def gantry_deg(self) -> NDArray[np.float64]: ...

    @property
    def leaves_mm(self) -> NDArray[np.float64]: ...

    @property
    def jaws_mm(self) -> NDArray[np.float64]: ...

    @property
    def cumulative_mu(self) -> NDArray[np.float64]: ...

    @property
    def collimator_deg(self) -> float: ...

    @property
    def direction(self) -> enum.Enum: ...

    @property
    def total_mu(self) -> float: ...


def write_rtplan(
    path: Path,
    *,
    sequence: ArcSequenceLike,
    machine: MachineModel,
    case: Case,
    isocenter_mm: tuple[float, float, float],
    plan_label: str = "AIRT VMAT",
    fractions: int,
    rx_gy: float,
    dose_rate_mu_min: float,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    verdict: str = "",
    p1_met: bool | None = None,
) -> str:
    """Write a single-arc VMAT RT Plan and return its SOP Instance UID.

    Parameters
    ----------
    path
        Output file (written atomically; the folder is created).
    sequence
        The sequenced arc; its MU are per fraction.
    machine
        Machine model: name, energy, SAD, source-MLC distance and leaf boundaries.
    case
        The planned case; ``case.dicom`` must name the source CT file and RT Structure Set.
    isocenter_mm
        Isocenter (x, y, z) in patient coordinates (LPS), mm.
    plan_label
        RTPlanLabel, 1-16 characters without backslash or control characters.
    fractions
        Number of fractions planned (>= 1).
    rx_gy
        Total prescribed dose to the PTV over all fractions, Gy (> 0).
    dose_rate_mu_min
        DoseRateSet, MU/min (> 0, at most the machine's maximum).
    sop_instance_uid, series_instance_uid
        UIDs to use; new ones are made when ``None``.
    verdict, p1_met
        The plan's verdict against its clinical goals (``pipeline.goals.Verdict.text``) and whether
        every priority-1 goal was met: ``RTPlanName`` says "P1 met" or "P1 FAILED" and
        ``RTPlanDescription`` carries the verdict, where a TPS shows them beside the plan.

    Returns
    -------
    str
        The plan's SOP Instance UID (the RT Dose references it).

    Raises
    ------
    ExportError
        If the inputs are inconsistent (shapes, leaf order, non-monotonic MU, a DS value that
        would not fit, missing source files); the message names the offending input.
    """
    refs = case.dicom
    if refs is None:
        raise ExportError(
            f"case {case.case_id} has no DICOM references (it was not loaded from DICOM); "
            "an RT Plan needs the source CT and RT Structure Set"
        )
    _check_scalars(plan_label=plan_label, fractions=fractions, rx_gy=rx_gy,
                   dose_rate_mu_min=dose_rate_mu_min, machine=machine, isocenter_mm=isocenter_mm)
    gantry, leaves, jaws, cum_mu, total_mu = _checked_arrays(sequence, machine)
    plan_uid = check_written_uid(sop_instance_uid, "plan SOP Instance UID") if sop_instance_uid else new_uid()
    series_uid = check_written_uid(series_instance_uid, "plan Series Instance UID") if series_instance_uid else new_uid()

    ct = read_source(refs.source_ct_path, "source CT")
    if ct.get("FrameOfReferenceUID") != refs.frame_of_reference_uid:
        raise ExportError(
            f"source CT {refs.source_ct_path} has Frame of Reference {ct.get('FrameOfReferenceUID')}, "
            f"but case {case.case_id} was planned on {refs.frame_of_reference_uid}; "
            "the case's DicomRefs point to the wrong CT file"
        )
    ptv_roi = _ptv_roi_number(refs.rtstruct_path, case.structure_names.get(Role.PTV))
    now = dt.datetime.now()

    ds = Dataset()
    copy_patient_study(ct, ds)
    # SOP Common
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = plan_uid
    set_instance_creation(ds, now)
    # RT Series
    ds.Modality = "RTPLAN"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 900  # a new series; a number keeps DICOMDIR builders and TPS lists happy
    ds.SeriesDescription = f"{plan_label} ({RESEARCH_NOTE.lower()})"[:64]
    ds.OperatorsName = None
    # General Equipment
    set_equipment(ds)
    # RT General Plan
    ds.RTPlanLabel = plan_label
    goals_word = "" if p1_met is None else (" P1 met" if p1_met else " P1 FAILED")
    ds.RTPlanName = f"{plan_label}{goals_word} research"[:64]
    about = (f"{RESEARCH_NOTE}. Automatically planned single-arc VMAT, {rx_gy:g} Gy in {fractions} "
             f"fractions, {total_mu:.1f} MU per fraction. Review in a treatment planning system before any use.")
    if verdict:
        clean = "".join(c if c.isprintable() and c != "\\" else " " for c in verdict)
        about = f"Clinical goals: {clean[:1024 - len(about) - 20]}. {about}"
    ds.RTPlanDescription = about
    ds.RTPlanDate = now.strftime("%Y%m%d")
    ds.RTPlanTime = now.strftime("%H%M%S")
    ds.PlanIntent = PlanIntent.RESEARCH.value
    ds.RTPlanGeometry = PlanGeometry.PATIENT.value
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RTStructureSetStorage
    ref_ss.ReferencedSOPInstanceUID = refs.rtstruct_sop_instance_uid
    ds.ReferencedStructureSetSequence = Sequence([ref_ss])
    # RT Prescription
    ds.DoseReferenceSequence = Sequence([_dose_reference(ptv_roi, rx_gy, case)])
    # RT Fraction Scheme
    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = fractions
    fg.NumberOfBeams = 1
    fg.NumberOfBrachyApplicationSetups = 0
    ref_beam = Dataset()
    ref_beam.ReferencedBeamNumber = 1
    ref_beam.BeamMeterset = format_ds(total_mu)
    fg.ReferencedBeamSequence = Sequence([ref_beam])
    ds.FractionGroupSequence = Sequence([fg])
    # RT Patient Setup
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = str(ct.get("PatientPosition") or case.patient_position.value)
    ds.PatientSetupSequence = Sequence([setup])
    # RT Beams
    ds.BeamSequence = Sequence(
        [_beam(sequence, machine, gantry, leaves, jaws, cum_mu, total_mu, isocenter_mm, dose_rate_mu_min)]
    )
    # Approval
    ds.ApprovalStatus = ApprovalStatus.UNAPPROVED.value

    _validate_dataset(ds)
    save_dataset(ds, path)
    logger.info(
        "RT Plan %s for case %s: %d control points, %.1f MU per fraction, structure set %s",
        plan_uid, case.case_id, len(gantry), total_mu, refs.rtstruct_sop_instance_uid,
    )
    return plan_uid


def _check_scalars(
    *,
    plan_label: str,
    fractions: int,
    rx_gy: float,
    dose_rate_mu_min: float,
    machine: MachineModel,
    isocenter_mm: tuple[float, float, float],
) -> None:
    if not 1 <= len(plan_label.strip()) <= 16 or "\\" in plan_label or not plan_label.isprintable():
        raise ExportError(
            f"plan label {plan_label!r} must have 1-16 printable characters without backslash "
            "(DICOM RTPlanLabel is SH)"
        )
    if not 1 <= len(machine.name) <= 16 or "\\" in machine.name:
        raise ExportError(
            f"machine name {machine.name!r} must have 1-16 characters without backslash "
            "(DICOM TreatmentMachineName is SH); fix [machine] name in the configuration"
        )
    if int(fractions) != fractions or fractions < 1:
        raise ExportError(f"fractions must be an integer >= 1, got {fractions!r}")
    if not np.isfinite(rx_gy) or rx_gy <= 0:
        raise ExportError(f"prescribed dose rx_gy must be a finite number > 0 Gy, got {rx_gy!r}")
    if not np.isfinite(dose_rate_mu_min) or not 0 < dose_rate_mu_min <= machine.max_dose_rate_mu_min:
        raise ExportError(
            f"dose_rate_mu_min must be in (0, {machine.max_dose_rate_mu_min}] MU/min "
            f"(machine {machine.name}), got {dose_rate_mu_min!r}"
        )
    if len(isocenter_mm) != 3 or not np.all(np.isfinite(isocenter_mm)):
        raise ExportError(f"isocenter_mm must be three finite coordinates in mm, got {isocenter_mm!r}")


def _checked_arrays(
    sequence: ArcSequenceLike, machine: MachineModel
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]:
    """Shapes, finiteness, ranges and orderings of the sequence; raises ExportError."""
    gantry = np.asarray(sequence.gantry_deg, dtype=np.float64)
    leaves = np.asarray(sequence.leaves_mm, dtype=np.float64)
    jaws = np.asarray(sequence.jaws_mm, dtype=np.float64)
    cum = np.asarray(sequence.cumulative_mu, dtype=np.float64)
    total = float(sequence.total_mu)
    n_cp = gantry.shape[0] if gantry.ndim == 1 else -1
    n_pairs = machine.n_leaf_pairs
    if n_cp < 2:
        raise ExportError(f"an arc needs at least 2 control points, gantry_deg has shape {gantry.shape}")
    expected = {"leaves_mm": (leaves, (n_cp, n_pairs, 2)), "jaws_mm": (jaws, (n_cp, 4)),
                "cumulative_mu": (cum, (n_cp,))}
    for name, (arr, shape) in expected.items():
        if arr.shape != shape:
            raise ExportError(
                f"sequence {name} has shape {arr.shape}, expected {shape} "
                f"({n_cp} control points, {n_pairs} leaf pairs of machine {machine.name})"
            )
        if not np.all(np.isfinite(arr)):
            raise ExportError(f"sequence {name} holds NaN or infinite values")
    if not np.all(np.isfinite(gantry)) or np.any((gantry < 0) | (gantry >= 360)):
        raise ExportError("sequence gantry_deg must hold finite angles in [0, 360) degrees")
    coll = float(sequence.collimator_deg)
    if not 0 <= coll < 360:
        raise ExportError(f"sequence collimator_deg must be in [0, 360) degrees, got {coll}")
    if str(getattr(sequence.direction, "value", sequence.direction)) not in ("CW", "CC"):
        raise ExportError(f"sequence direction must be CW or CC, got {sequence.direction!r}")
    if not np.isfinite(total) or total <= 0:
        raise ExportError(f"sequence total_mu must be > 0, got {total}")
    if abs(cum[0]) > 1e-9 * total:
        raise ExportError(f"cumulative_mu must start at 0, got {cum[0]}")
    if abs(cum[-1] - total) > 1e-6 * total:
        raise ExportError(f"cumulative_mu ends at {cum[-1]} MU but total_mu is {total} MU")
    if np.any(np.diff(cum) < 0):
        k = int(np.argmax(np.diff(cum) < 0))
        raise ExportError(f"cumulative_mu decreases between control points {k} and {k + 1}")
    bad = np.argwhere(leaves[..., 0] > leaves[..., 1])
    if bad.size:
        cp, pair = (int(v) for v in bad[0])
        raise ExportError(
            f"leaf pair {pair + 1} at control point {cp}: bank A {leaves[cp, pair, 0]:.3f} mm is beyond "
            f"bank B {leaves[cp, pair, 1]:.3f} mm (leaves would collide)"
        )
    if np.any(jaws[:, 0] > jaws[:, 1]) or np.any(jaws[:, 2] > jaws[:, 3]):
        raise ExportError("jaws_mm must satisfy X1 <= X2 and Y1 <= Y2 at every control point")
    limit = machine.max_jaw_mm
    if np.any(np.abs(jaws) > limit + _TOL) or np.any(np.abs(leaves) > limit + _TOL):
        raise ExportError(f"jaw or leaf positions beyond +/-{limit} mm (machine {machine.name} max_jaw_mm)")
    return gantry, leaves, jaws, cum, total


def _ptv_roi_number(rtstruct_path: str, ptv_name: str | None) -> int | None:
    """ROI number of the PTV in the referenced RT Structure Set, or None if it cannot be named."""
    if not ptv_name:
        return None
    rtss = read_source(rtstruct_path, "RT Structure Set")
    for roi in rtss.get("StructureSetROISequence", []):
        if str(roi.get("ROIName", "")).strip() == ptv_name.strip():
            return int(roi.ROINumber)
    logger.warning("PTV ROI %r not found in structure set %s; dose reference written as SITE",
                   ptv_name, rtss.get("SOPInstanceUID"))
    return None


def _dose_reference(ptv_roi: int | None, rx_gy: float, case: Case) -> Dataset:
    """The PTV target dose reference (VOLUME on the PTV ROI when known, else SITE)."""
    ref = Dataset()
    ref.DoseReferenceNumber = 1
    if ptv_roi is not None:
        ref.DoseReferenceStructureType = "VOLUME"
        ref.ReferencedROINumber = ptv_roi
    else:
        ref.DoseReferenceStructureType = "SITE"
    ref.DoseReferenceDescription = case.structure_names.get(Role.PTV, "PTV")[:64]
    ref.DoseReferenceType = "TARGET"
    ref.TargetPrescriptionDose = format_ds(rx_gy)
    return ref


def _device_position(kind: DeviceType, values: NDArray[np.float64]) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind.value
    item.LeafJawPositions = format_ds_list(values)
    return item


def _beam(
    sequence: ArcSequenceLike,
    machine: MachineModel,
    gantry: NDArray[np.float64],
    leaves: NDArray[np.float64],
    jaws: NDArray[np.float64],
    cum_mu: NDArray[np.float64],
    total_mu: float,
    isocenter_mm: tuple[float, float, float],
    dose_rate_mu_min: float,
) -> Dataset:
    """The one VMAT beam with its control points."""
    n_cp = len(gantry)
    direction = RotationDirectionCode(str(getattr(sequence.direction, "value", sequence.direction)))
    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = f"Arc1 {direction.value}"
    beam.BeamDescription = f"VMAT arc {gantry[0]:.1f}-{gantry[-1]:.1f} deg {direction.value} ({RESEARCH_NOTE})"
    beam.BeamType = BeamType.DYNAMIC.value
    beam.RadiationType = RadiationType.PHOTON.value
    beam.TreatmentMachineName = machine.name
    beam.PrimaryDosimeterUnit = "MU"
    beam.SourceAxisDistance = format_ds(machine.sad_mm)
    devices = []
    for kind in (DeviceType.ASYMX, DeviceType.ASYMY):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind.value
        d.NumberOfLeafJawPairs = 1
        devices.append(d)
    mlc = Dataset()
    mlc.RTBeamLimitingDeviceType = DeviceType.MLCX.value
    mlc.SourceToBeamLimitingDeviceDistance = format_ds(machine.source_mlc_distance_mm)
    mlc.NumberOfLeafJawPairs = machine.n_leaf_pairs
    mlc.LeafPositionBoundaries = format_ds_list(machine.leaf_boundaries_mm)
    devices.append(mlc)
    beam.BeamLimitingDeviceSequence = Sequence(devices)
    beam.ReferencedPatientSetupNumber = 1
    beam.TreatmentDeliveryType = TreatmentDeliveryType.TREATMENT.value
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.FinalCumulativeMetersetWeight = "1"
    beam.NumberOfControlPoints = n_cp

    weights = cum_mu / total_mu
    weights[0] = 0.0
    weights[-1] = 1.0
    weights = np.clip(np.maximum.accumulate(weights), 0.0, 1.0)
    cps = []
    for k in range(n_cp):
        cp = Dataset()
        cp.ControlPointIndex = k
        if k == 0:
            cp.NominalBeamEnergy = format_ds(machine.energy_mv)
            cp.DoseRateSet = format_ds(dose_rate_mu_min)
        positions = []
        if k == 0 or not np.allclose(jaws[k, :2], jaws[k - 1, :2], atol=_TOL, rtol=0):
            positions.append(_device_position(DeviceType.ASYMX, jaws[k, :2]))
        if k == 0 or not np.allclose(jaws[k, 2:], jaws[k - 1, 2:], atol=_TOL, rtol=0):
            positions.append(_device_position(DeviceType.ASYMY, jaws[k, 2:]))
        positions.append(_device_position(DeviceType.MLCX, np.concatenate([leaves[k, :, 0], leaves[k, :, 1]])))
        cp.BeamLimitingDevicePositionSequence = Sequence(positions)
        cp.GantryAngle = format_ds(gantry[k])
        cp.GantryRotationDirection = (direction if k < n_cp - 1 else RotationDirectionCode.NONE).value
        if k == 0:
            cp.BeamLimitingDeviceAngle = format_ds(sequence.collimator_deg)
            cp.BeamLimitingDeviceRotationDirection = RotationDirectionCode.NONE.value
            cp.PatientSupportAngle = "0"
            cp.PatientSupportRotationDirection = RotationDirectionCode.NONE.value
            cp.TableTopEccentricAngle = "0"
            cp.TableTopEccentricRotationDirection = RotationDirectionCode.NONE.value
            cp.TableTopVerticalPosition = None
            cp.TableTopLongitudinalPosition = None
            cp.TableTopLateralPosition = None
            cp.IsocenterPosition = format_ds_list(isocenter_mm)
        cp.CumulativeMetersetWeight = format_ds(float(weights[k]))
        cps.append(cp)
    beam.ControlPointSequence = Sequence(cps)
    return beam


def _validate_dataset(ds: Dataset) -> None:
    """Checks on the dataset as it will be written (after DS formatting); raises ExportError."""
    for beam in ds.BeamSequence:
        cps = beam.ControlPointSequence
        if int(beam.NumberOfControlPoints) != len(cps):
            raise ExportError(f"beam {beam.BeamNumber}: NumberOfControlPoints does not match the sequence")
        weights = np.array([float(cp.CumulativeMetersetWeight) for cp in cps])
        final = float(beam.FinalCumulativeMetersetWeight)
        if weights[0] != 0.0 or weights[-1] != final or np.any(np.diff(weights) < 0):
            raise ExportError(
                f"beam {beam.BeamNumber}: cumulative meterset weights must rise from 0 to {final} "
                "without decreasing after formatting"
            )
        for cp in cps:
            for dev in cp.BeamLimitingDevicePositionSequence:
                pos = np.array([float(v) for v in dev.LeafJawPositions])
                half = len(pos) // 2
                if np.any(pos[:half] > pos[half:]):
                    raise ExportError(
                        f"beam {beam.BeamNumber} control point {cp.ControlPointIndex}: "
                        f"{dev.RTBeamLimitingDeviceType} positions are out of order after formatting"
                    )
