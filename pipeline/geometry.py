"""Beam geometry: IEC 61217 gantry/collimator/couch rotations expressed in DICOM patient coordinates.

Torch-free. Every beam quantity of the project (BEV projection, dose engine, fluence maps) lives
in the IEC 61217 *beam-limiting-device* frame ``b``: ``x_b`` along leaf travel, ``y_b`` along the
leaf-pair axis, ``z_b`` from the isocenter towards the source. This module gives the rotation that
takes a vector from that frame into DICOM patient coordinates (LPS, see ``core.case``).

Chain of frames (IEC 61217, all rotations right-handed about the named axis):

* fixed ``f``: origin at the isocenter, ``x_f`` to the right of an observer standing at the foot of
  the couch facing the gantry, ``y_f`` from the isocenter towards the gantry, ``z_f`` up;
* gantry ``g``: rotation by the gantry angle about ``y_f`` (clockwise seen from the foot of the
  couch); at gantry 0 the source is above the isocenter, at gantry 90 it is at ``+x_f``;
* beam-limiting device ``b``: rotation by the collimator angle about ``z_g``;
* patient support ``s``: rotation by the couch angle about ``z_f``; the table top carries the patient;
* patient: the table-top frame mapped to LPS by the DICOM PatientPosition. Head first puts the
  patient's head towards the gantry (``+z`` = ``+y_f``), supine puts the anterior side up
  (``-y`` = ``+z_f``); feet first and prone mirror the corresponding axes so the map stays a rotation.

Checks worked by hand (and tested): HFS gantry 0 puts the source anterior (``-y``), HFS gantry 90
at the patient's left (``+x``), HFS gantry 180 posterior, HFS gantry 270 at the patient's right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from core.case import PatientPosition
from core.errors import ConfigError
from core.machine import ArcSpec, MachineModel

log = logging.getLogger(__name__)

# Columns: the IEC table-top axes (x_t, y_t, z_t) expressed in DICOM LPS, per patient position.
_TABLE_TO_LPS: dict[PatientPosition, NDArray[np.float64]] = {
    PatientPosition.HFS: np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    PatientPosition.FFS: np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]),
    PatientPosition.HFP: np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    PatientPosition.FFP: np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def _rot_y(deg: float) -> NDArray[np.float64]:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(deg: float) -> NDArray[np.float64]:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def beam_to_patient(gantry_deg: float, collimator_deg: float, couch_deg: float,
                    position: PatientPosition | str) -> NDArray[np.float64]:
    """Rotation from the IEC beam-limiting-device frame to DICOM patient (LPS) coordinates.

    Parameters
    ----------
    gantry_deg
        IEC 61217 gantry angle, degrees (any real value; taken modulo 360).
    collimator_deg
        IEC 61217 beam-limiting-device angle, degrees.
    couch_deg
        IEC 61217 patient-support angle, degrees (0 for this planner).
    position
        DICOM PatientPosition (HFS, FFS, HFP or FFP).

    Returns
    -------
    numpy.ndarray
        (3, 3) orthonormal matrix with determinant +1 whose columns are the unit vectors ``x_b``
        (leaf travel), ``y_b`` (leaf-pair axis) and ``z_b`` (towards the source) in LPS; a vector
        ``v_b`` in the beam frame is ``R @ v_b`` in patient coordinates.

    Raises
    ------
    ConfigError
        If ``position`` is not one of the supported patient positions.
    """
    try:
        pos = PatientPosition(position)
    except ValueError:
        raise ConfigError(
            f"patient position {position!r} is not supported; use one of "
            f"{', '.join(p.value for p in PatientPosition)}"
        ) from None
    fixed_from_beam = _rot_y(gantry_deg) @ _rot_z(collimator_deg)
    table_from_fixed = _rot_z(couch_deg).T
    return _TABLE_TO_LPS[pos] @ table_from_fixed @ fixed_from_beam


def source_position_mm(gantry_deg: float, collimator_deg: float, couch_deg: float,
                       position: PatientPosition | str, isocenter_mm: tuple[float, float, float] | NDArray,
                       sad_mm: float = 1000.0) -> NDArray[np.float64]:
    """Position of the radiation source in patient coordinates (LPS, mm).

    Parameters
    ----------
    gantry_deg, collimator_deg, couch_deg, position
        As for :func:`beam_to_patient`.
    isocenter_mm
        (x, y, z) of the isocenter, mm.
    sad_mm
        Source-axis distance, mm (> 0).

    Returns
    -------
    numpy.ndarray
        (3,) source position, mm.
    """
    if not sad_mm > 0:
        raise ConfigError(f"sad_mm must be > 0, got {sad_mm}")
    rot = beam_to_patient(gantry_deg, collimator_deg, couch_deg, position)
    return np.asarray(isocenter_mm, dtype=np.float64) + sad_mm * rot[:, 2]


@dataclass(frozen=True)
class ArcGeometry:
    """The geometry of one arc on one patient: what the BEV projection and the dose engine share.

    Parameters
    ----------
    arc
        The arc (angles, sectors, collimator and couch angles).
    isocenter_mm
        (x, y, z) of the isocenter in patient coordinates, mm (the PTV centroid).
    position
        DICOM PatientPosition of the CT.
    machine
        The linac (SAD, BEV grid).
    """

    arc: ArcSpec
    isocenter_mm: tuple[float, float, float]
    position: PatientPosition
    machine: MachineModel

    def __post_init__(self) -> None:
        if len(self.isocenter_mm) != 3 or not all(np.isfinite(self.isocenter_mm)):
            raise ConfigError(f"isocenter_mm must be three finite values in mm, got {self.isocenter_mm}")

    @property
    def n_sectors(self) -> int:
        """Number of fluence maps (control-point sectors) of the arc."""
        return self.arc.n_sectors

    def gantry_angles_deg(self) -> NDArray[np.float64]:
        """Gantry angle where each fluence map is placed (sector centres), degrees."""
        return self.arc.sector_centres_deg()

    def sector_rotations(self) -> NDArray[np.float64]:
        """Beam-to-patient rotations of every sector, shape (n_sectors, 3, 3) (see :func:`beam_to_patient`)."""
        return np.stack([
            beam_to_patient(float(g), self.arc.collimator_deg, self.arc.couch_deg, self.position)
            for g in self.gantry_angles_deg()
        ])

    def sources_mm(self) -> NDArray[np.float64]:
        """Source position of every sector in patient coordinates, shape (n_sectors, 3), mm."""
        rot = self.sector_rotations()
        return np.asarray(self.isocenter_mm, dtype=np.float64)[None, :] + self.machine.sad_mm * rot[:, :, 2]
