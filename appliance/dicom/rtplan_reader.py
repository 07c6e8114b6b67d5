"""Read a DICOM RT Plan (VMAT or IMRT, ours or a clinical export) into plain arrays.

Control points only carry what changed (PS3.3 C.8.8.14): an attribute absent from a later
control point keeps its previous value. The reader carries forward the gantry angle and
direction, collimator and couch angles, jaws and MLC, so every control point of
:class:`BeamData` is complete. Jaws come from ASYMX/X and ASYMY/Y devices; a beam without one
of them gets NaN for those jaws. MU at a control point is
``BeamMeterset * CumulativeMetersetWeight / FinalCumulativeMetersetWeight`` with BeamMeterset
from the (first) fraction group. Coded values (modality, delivery type, device types, rotation
directions) are compared with the enums the writer uses (:mod:`appliance.dicom.rtplan`,
:mod:`appliance.dicom.rtplan_beam`), so each has one home.

:func:`arc_sequence_from_beam` turns one VMAT beam into ``sequencing.sequencer.ArcSequence``
(imported only there) so that ``fluence_from_sequence`` can make fluence maps of clinical plans.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from appliance.dicom.rtplan import MODALITY
from appliance.dicom.rtplan_beam import (
    JAW_DEVICES,
    MLC_DEVICES,
    ROTATING,
    RotationDirectionCode,
    TreatmentDeliveryType,
)
from core.errors import ExportError

if TYPE_CHECKING:
    from sequencing.sequencer import ArcSequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BeamData:
    """One beam of an RT Plan with every control point filled in.

    Attributes
    ----------
    beam_number, beam_name, beam_type
        BeamNumber, BeamName and BeamType (STATIC or DYNAMIC).
    machine_name
        TreatmentMachineName ("" when absent).
    sad_mm
        SourceAxisDistance, mm (NaN when absent).
    meterset_mu
        BeamMeterset of the fraction group, MU per fraction (NaN when absent).
    energy_mv
        NominalBeamEnergy of control point 0, MV (NaN when absent).
    dose_rate_mu_min
        DoseRateSet of control point 0, MU/min (NaN when absent).
    isocenter_mm
        IsocenterPosition (x, y, z) of control point 0, mm, or None.
    leaf_boundaries_mm
        (n_pairs + 1,) MLCX LeafPositionBoundaries, mm, or None without an MLC.
    gantry_deg, collimator_deg, couch_deg
        (n_cp,) angles per control point, degrees.
    gantry_direction
        Per control point: "CW", "CC" or "NONE" (:class:`~appliance.dicom.rtplan_beam.RotationDirectionCode`).
    jaws_mm
        (n_cp, 4) X1, X2, Y1, Y2, mm; NaN for a jaw pair the beam does not have.
    leaves_mm
        (n_cp, n_pairs, 2) MLC positions (bank A, bank B), mm, or None without an MLC.
    cumulative_weight
        (n_cp,) CumulativeMetersetWeight.
    final_weight
        FinalCumulativeMetersetWeight (> 0).
    """

    beam_number: int
    beam_name: str
    beam_type: str
    machine_name: str
    sad_mm: float
    meterset_mu: float
    energy_mv: float
    dose_rate_mu_min: float
    isocenter_mm: tuple[float, float, float] | None
    leaf_boundaries_mm: NDArray[np.float64] | None
    gantry_deg: NDArray[np.float64]
    collimator_deg: NDArray[np.float64]
    couch_deg: NDArray[np.float64]
    gantry_direction: tuple[str, ...]
    jaws_mm: NDArray[np.float64]
    leaves_mm: NDArray[np.float64] | None
    cumulative_weight: NDArray[np.float64]
    final_weight: float

    @property
    def n_control_points(self) -> int:
        """Number of control points."""
        return int(self.gantry_deg.shape[0])

    @property
    def cumulative_mu(self) -> NDArray[np.float64]:
        """(n_cp,) MU delivered up to each control point, per fraction."""
        return self.meterset_mu * self.cumulative_weight / self.final_weight

    @property
    def is_arc(self) -> bool:
        """True when the gantry rotates during the beam (a VMAT or conformal arc)."""
        return any(d in ROTATING for d in self.gantry_direction[:-1])


@dataclass(frozen=True, eq=False)
class PlanData:
    """What the planner needs from an RT Plan.

    Attributes
    ----------
    sop_instance_uid, series_instance_uid, study_instance_uid, frame_of_reference_uid
        UIDs of the plan (empty string where absent).
    structure_set_uid
        ReferencedSOPInstanceUID of the referenced RT Structure Set ("" when none).
    plan_label, approval_status
        RTPlanLabel and ApprovalStatus ("" when absent).
    fractions_planned
        NumberOfFractionsPlanned of the first fraction group (0 when absent).
    patient_position
        PatientPosition of the first patient setup ("" when absent).
    beams
        The treatment beams referenced by the fraction group, in BeamSequence order.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    structure_set_uid: str
    plan_label: str
    approval_status: str
    fractions_planned: int
    patient_position: str
    beams: tuple[BeamData, ...]

    @property
    def total_mu(self) -> float:
        """Sum of the beams' metersets, MU per fraction."""
        return float(sum(b.meterset_mu for b in self.beams))


def read_rtplan(path: str | os.PathLike[str]) -> PlanData:
    """Read an RT Plan file.

    Parameters
    ----------
    path
        A DICOM RT Plan (photon beams; VMAT, dynamic or step-and-shoot IMRT, static fields).

    Returns
    -------
    PlanData
        Plan UIDs and, per beam, complete control points.

    Raises
    ------
    ExportError
        If the file is not an RT Plan, has no beams, or a beam's control points are
        inconsistent (first control point without gantry angle, MLC with a wrong number of
        positions, no meterset weights); the message names the beam and control point.
    """
    where = os.fspath(path)
    try:
        ds = pydicom.dcmread(where)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(f"cannot read RT Plan {where!r}: {exc}") from exc
    if ds.get("Modality") != MODALITY or "BeamSequence" not in ds:
        raise ExportError(f"{where!r} is not an RT Plan with a BeamSequence (Modality {ds.get('Modality')})")
    metersets, fractions = _fraction_group(ds)
    beams = []
    for beam in ds.BeamSequence:
        number = int(beam.BeamNumber)
        if str(beam.get("TreatmentDeliveryType", TreatmentDeliveryType.TREATMENT)) != TreatmentDeliveryType.TREATMENT:
            continue  # setup fields and verification images deliver no treatment MU
        if metersets and number not in metersets:
            continue
        beams.append(_read_beam(beam, metersets.get(number, float("nan")), where))
    if not beams:
        raise ExportError(f"RT Plan {where!r} has no treatment beam referenced by its fraction group")
    ss = ds.get("ReferencedStructureSetSequence")
    setup = ds.get("PatientSetupSequence")
    plan = PlanData(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        structure_set_uid=str(ss[0].ReferencedSOPInstanceUID) if ss else "",
        plan_label=str(ds.get("RTPlanLabel", "")),
        approval_status=str(ds.get("ApprovalStatus", "")),
        fractions_planned=fractions,
        patient_position=str(setup[0].get("PatientPosition", "")) if setup else "",
        beams=tuple(beams),
    )
    logger.info("read RT Plan %s: %d beams, %.1f MU per fraction", plan.sop_instance_uid,
                len(plan.beams), plan.total_mu)
    return plan


def _fraction_group(ds: Dataset) -> tuple[dict[int, float], int]:
    """BeamMeterset by beam number and fractions planned, from the lowest-numbered fraction group."""
    groups = list(ds.get("FractionGroupSequence", []))
    if not groups:
        return {}, 0
    fg = min(groups, key=lambda g: int(g.get("FractionGroupNumber", 0) or 0))
    metersets: dict[int, float] = {}
    for ref in fg.get("ReferencedBeamSequence", []):
        value = ref.get("BeamMeterset")
        metersets[int(ref.ReferencedBeamNumber)] = float(value) if value not in (None, "") else float("nan")
    return metersets, int(fg.get("NumberOfFractionsPlanned", 0) or 0)


def _num(item: Dataset, keyword: str, default: float = float("nan")) -> float:
    value = item.get(keyword)
    return float(value) if value not in (None, "") else default


def _read_beam(beam: Dataset, meterset: float, where: str) -> BeamData:
    number = int(beam.BeamNumber)
    label = f"RT Plan {where!r} beam {number}"
    n_pairs = 0
    boundaries: NDArray[np.float64] | None = None
    for dev in beam.get("BeamLimitingDeviceSequence", []):
        if dev.RTBeamLimitingDeviceType in MLC_DEVICES:
            n_pairs = int(dev.NumberOfLeafJawPairs)
            if "LeafPositionBoundaries" in dev:
                boundaries = np.array([float(v) for v in dev.LeafPositionBoundaries])
    cps = list(beam.get("ControlPointSequence", []))
    if not cps:
        raise ExportError(f"{label} has no control points")
    n_cp = len(cps)
    gantry = np.empty(n_cp)
    coll = np.empty(n_cp)
    couch = np.empty(n_cp)
    weights = np.empty(n_cp)
    jaws = np.full((n_cp, 4), np.nan)
    leaves = np.full((n_cp, n_pairs, 2), np.nan) if n_pairs else None
    directions: list[str] = []
    state: dict[str, Any] = {"gantry": None, "coll": 0.0, "couch": 0.0, "dir": RotationDirectionCode.NONE.value,
                             "weight": None}
    cur_jaws = np.full(4, np.nan)
    cur_leaves: NDArray[np.float64] | None = None
    for k, cp in enumerate(cps):
        if "GantryAngle" in cp:
            state["gantry"] = float(cp.GantryAngle)
        if "GantryRotationDirection" in cp:
            state["dir"] = str(cp.GantryRotationDirection)
        if "BeamLimitingDeviceAngle" in cp:
            state["coll"] = float(cp.BeamLimitingDeviceAngle)
        if "PatientSupportAngle" in cp:
            state["couch"] = float(cp.PatientSupportAngle)
        if cp.get("CumulativeMetersetWeight") not in (None, ""):
            state["weight"] = float(cp.CumulativeMetersetWeight)
        for dev in cp.get("BeamLimitingDevicePositionSequence", []):
            kind = str(dev.RTBeamLimitingDeviceType)
            pos = np.array([float(v) for v in dev.LeafJawPositions])
            if kind in JAW_DEVICES:
                if pos.size != 2:
                    raise ExportError(f"{label} control point {k}: {kind} has {pos.size} positions, expected 2")
                i = JAW_DEVICES[kind]
                cur_jaws[i : i + 2] = pos
            elif kind in MLC_DEVICES and n_pairs:
                if pos.size != 2 * n_pairs:
                    raise ExportError(
                        f"{label} control point {k}: {kind} has {pos.size} positions, expected {2 * n_pairs}"
                    )
                cur_leaves = np.stack([pos[:n_pairs], pos[n_pairs:]], axis=-1)
        if state["gantry"] is None:
            raise ExportError(f"{label}: control point 0 has no GantryAngle")
        if state["weight"] is None:
            raise ExportError(
                f"{label} control point {k} has no CumulativeMetersetWeight; export the plan "
                "with its dose calculated"
            )
        gantry[k], coll[k], couch[k], weights[k] = state["gantry"], state["coll"], state["couch"], state["weight"]
        directions.append(state["dir"])
        jaws[k] = cur_jaws
        if leaves is not None:
            if cur_leaves is None:
                raise ExportError(f"{label}: control point 0 has no MLC positions")
            leaves[k] = cur_leaves
    cp0 = cps[0]
    iso = cp0.get("IsocenterPosition")
    final = _num(beam, "FinalCumulativeMetersetWeight", weights[-1])
    if not final > 0:
        raise ExportError(f"{label}: FinalCumulativeMetersetWeight must be > 0, got {final}")
    return BeamData(
        beam_number=number,
        beam_name=str(beam.get("BeamName", "")),
        beam_type=str(beam.get("BeamType", "")),
        machine_name=str(beam.get("TreatmentMachineName", "")),
        sad_mm=_num(beam, "SourceAxisDistance"),
        meterset_mu=meterset,
        energy_mv=_num(cp0, "NominalBeamEnergy"),
        dose_rate_mu_min=_num(cp0, "DoseRateSet"),
        isocenter_mm=(float(iso[0]), float(iso[1]), float(iso[2])) if iso else None,
        leaf_boundaries_mm=boundaries,
        gantry_deg=gantry,
        collimator_deg=coll,
        couch_deg=couch,
        gantry_direction=tuple(directions),
        jaws_mm=jaws,
        leaves_mm=leaves,
        cumulative_weight=weights,
        final_weight=final,
    )


def arc_sequence_from_beam(beam: BeamData) -> ArcSequence:
    """Convert one single-arc VMAT beam into a ``sequencing.sequencer.ArcSequence``.

    Parameters
    ----------
    beam
        A beam with an MLC, X and Y jaws, a meterset, one rotation direction and a fixed
        collimator angle.

    Returns
    -------
    sequencing.sequencer.ArcSequence
        Gantry angles, leaves, jaws and cumulative MU (per fraction) of the beam.

    Raises
    ------
    ExportError
        If the beam is not a single-direction arc with MLC, jaws and meterset.
    """
    # Imported here: reading plans must not need the sequencer (and its Numba kernels).
    from core.machine import RotationDirection
    from sequencing.sequencer import ArcSequence

    label = f"beam {beam.beam_number} ({beam.beam_name})"
    moving = {d for d in beam.gantry_direction[:-1] if d != RotationDirectionCode.NONE}
    if len(moving) != 1:
        raise ExportError(f"{label} is not a single-direction arc "
                          f"(directions {sorted(moving) or [RotationDirectionCode.NONE.value]})")
    if beam.leaves_mm is None:
        raise ExportError(f"{label} has no MLC; an arc sequence needs leaf positions")
    if np.isnan(beam.jaws_mm).any():
        raise ExportError(f"{label} lacks X or Y jaw positions")
    if not np.isfinite(beam.meterset_mu):
        raise ExportError(f"{label} has no BeamMeterset in the fraction group")
    if np.ptp(beam.collimator_deg) > 1e-6:
        raise ExportError(f"{label}: the collimator rotates during the arc, which ArcSequence cannot hold")
    return ArcSequence(
        gantry_deg=np.mod(beam.gantry_deg, 360.0),
        leaves_mm=beam.leaves_mm.copy(),
        jaws_mm=beam.jaws_mm.copy(),
        cumulative_mu=beam.cumulative_mu,
        collimator_deg=float(beam.collimator_deg[0]),
        direction=RotationDirection(moving.pop()),
    )
