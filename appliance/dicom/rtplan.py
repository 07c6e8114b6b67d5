"""DICOM RT Plan writer for a single-arc VMAT plan, built from scratch with pydicom.

The plan holds the modules of the RT Plan IOD (PS3.3 A.20): SOP Common, Patient, General
Study, RT Series, Frame of Reference, General Equipment, RT General Plan, RT Prescription,
RT Fraction Scheme, RT Patient Setup, RT Beams and Approval. Patient, study and frame of
reference attributes are copied from the planning CT. The plan is research output: its
PlanIntent is RESEARCH, its name and description say it is not clinically approved and its
ApprovalStatus is always UNAPPROVED.

The beam and its control points are encoded by :mod:`appliance.dicom.rtplan_beam`.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RTPlanStorage, RTStructureSetStorage

from appliance.dicom.common import (
    RESEARCH_NOTE,
    copy_patient_study,
    format_ds,
    read_source,
    save_dataset,
    set_equipment,
    set_instance_creation,
)
from appliance.dicom.rtplan_beam import ArcSequenceLike, beam_dataset, checked_arrays, validate_beams
from appliance.dicom.uids import check_written_uid, new_uid
from core.case import Case, Role
from core.errors import ExportError
from core.machine import MachineModel

logger = logging.getLogger(__name__)


MODALITY = "RTPLAN"
"""Modality (0008,0060) of an RT Plan."""


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
    gantry, leaves, jaws, cum_mu, total_mu = checked_arrays(sequence, machine)
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
    ds.Modality = MODALITY
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
        [beam_dataset(sequence, machine, gantry, leaves, jaws, cum_mu, total_mu, isocenter_mm, dose_rate_mu_min)]
    )
    # Approval
    ds.ApprovalStatus = ApprovalStatus.UNAPPROVED.value

    validate_beams(ds)
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
