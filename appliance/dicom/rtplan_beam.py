"""The beam of a DICOM RT Plan: one single-arc VMAT beam and its control points, built with pydicom.

Control points (PS3.3 C.8.8.14): the first carries every attribute (energy, dose rate, jaws,
MLC, collimator, couch, isocenter); later ones carry the gantry angle, the rotation direction,
the MLC, the jaws when they changed, and the cumulative meterset weight. The weights are the
cumulative MU divided by the total MU (0 at the first control point, 1 at the last). The
rotation direction describes the segment *following* a control point (C.8.8.14.5), so the
last control point, which starts no segment, carries ``NONE``.

:func:`checked_arrays` checks the sequenced arc before anything is written,
:func:`beam_dataset` encodes it and :func:`validate_beams` checks the encoded values again
(after DS formatting). :mod:`appliance.dicom.rtplan` writes the plan around the beam.
"""

from __future__ import annotations

import enum
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.dicom.common import RESEARCH_NOTE, format_ds, format_ds_list
from core.errors import ExportError
from core.machine import MachineModel

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
    """DICOM TreatmentDeliveryType (300A,00CE) values this writer uses (the reader skips beams of any
    other type: setup fields and verification images deliver no treatment MU)."""

    TREATMENT = "TREATMENT"


class RotationDirectionCode(enum.StrEnum):
    """DICOM rotation directions (gantry, collimator, couch): CW, CC or NONE ("CCW" is wrong)."""

    CW = "CW"
    CC = "CC"
    NONE = "NONE"


class DeviceType(enum.StrEnum):
    """DICOM RTBeamLimitingDeviceType (300A,00B8): the writer uses ASYMX, ASYMY and MLCX; the reader
    (:mod:`appliance.dicom.rtplan_reader`) takes every defined term."""

    X = "X"
    Y = "Y"
    ASYMX = "ASYMX"
    ASYMY = "ASYMY"
    MLCX = "MLCX"
    MLCY = "MLCY"


JAW_DEVICES: dict[str, int] = {DeviceType.ASYMX: 0, DeviceType.X: 0, DeviceType.ASYMY: 2, DeviceType.Y: 2}
"""Jaw device types -> the index of their first position in (X1, X2, Y1, Y2)."""
MLC_DEVICES = frozenset({DeviceType.MLCX, DeviceType.MLCY})
"""Device types that are a multileaf collimator."""
ROTATING = frozenset({RotationDirectionCode.CW, RotationDirectionCode.CC})
"""Rotation directions in which the gantry moves (NONE: it stands still)."""


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


def checked_arrays(
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
    if str(getattr(sequence.direction, "value", sequence.direction)) not in ROTATING:
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


def _device_position(kind: DeviceType, values: NDArray[np.float64]) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind.value
    item.LeafJawPositions = format_ds_list(values)
    return item


def beam_dataset(
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


def validate_beams(ds: Dataset) -> None:
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
