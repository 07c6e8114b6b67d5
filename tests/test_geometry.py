"""Beam geometry against hand-derived IEC 61217 / DICOM patient-position cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.case import PatientPosition
from core.errors import ConfigError
from core.machine import ArcSpec, MachineModel
from pipeline.geometry import ArcGeometry, beam_to_patient, source_position_mm

# Where the source is (unit vector from the isocenter, LPS) for gantry 0/90/180/270, worked out by
# hand: IEC gantry 0 = source up, 90 = source at +x_f (right of an observer at the couch foot facing
# the gantry). Supine puts the anterior side (-y) up, prone the posterior side (+y); head first puts
# the patient's left (+x) at +x_f, feet first (or prone) mirrors it.
SOURCE_DIRECTION = {
    PatientPosition.HFS: {0: (0, -1, 0), 90: (1, 0, 0), 180: (0, 1, 0), 270: (-1, 0, 0)},
    PatientPosition.FFS: {0: (0, -1, 0), 90: (-1, 0, 0), 180: (0, 1, 0), 270: (1, 0, 0)},
    PatientPosition.HFP: {0: (0, 1, 0), 90: (-1, 0, 0), 180: (0, -1, 0), 270: (1, 0, 0)},
    PatientPosition.FFP: {0: (0, 1, 0), 90: (1, 0, 0), 180: (0, -1, 0), 270: (-1, 0, 0)},
}
# The leaf-pair axis y_b at collimator 0 points to the gantry: superior (+z) for head first.
GANTRY_AXIS = {PatientPosition.HFS: (0, 0, 1), PatientPosition.HFP: (0, 0, 1),
               PatientPosition.FFS: (0, 0, -1), PatientPosition.FFP: (0, 0, -1)}


@pytest.mark.parametrize("position", list(PatientPosition))
@pytest.mark.parametrize("gantry", [0, 90, 180, 270])
def test_source_direction_hand_derived(position: PatientPosition, gantry: int) -> None:
    rot = beam_to_patient(gantry, 0.0, 0.0, position)
    np.testing.assert_allclose(rot[:, 2], SOURCE_DIRECTION[position][gantry], atol=1e-12)
    np.testing.assert_allclose(rot[:, 1], GANTRY_AXIS[position], atol=1e-12)


def test_hfs_gantry0_collimator_axes() -> None:
    # HFS, gantry 0: leaves travel along the patient's left-right axis (x_b = patient left), leaf pairs
    # stack superior-inferior. Collimator 90 (counter-clockwise seen from the source) turns x_b to
    # superior and y_b to the patient's right.
    r0 = beam_to_patient(0.0, 0.0, 0.0, "HFS")
    np.testing.assert_allclose(r0[:, 0], (1, 0, 0), atol=1e-12)
    r90 = beam_to_patient(0.0, 90.0, 0.0, "HFS")
    np.testing.assert_allclose(r90[:, 0], (0, 0, 1), atol=1e-12)
    np.testing.assert_allclose(r90[:, 1], (-1, 0, 0), atol=1e-12)
    np.testing.assert_allclose(r90[:, 2], (0, -1, 0), atol=1e-12)


def test_couch_rotation_hfs() -> None:
    # Couch 90 (counter-clockwise seen from above) turns the patient's head from the gantry to -x_f,
    # so at gantry 90 the source (+x_f) is at the patient's feet; at gantry 0 it stays anterior.
    np.testing.assert_allclose(beam_to_patient(90.0, 0.0, 90.0, "HFS")[:, 2], (0, 0, -1), atol=1e-12)
    np.testing.assert_allclose(beam_to_patient(0.0, 0.0, 90.0, "HFS")[:, 2], (0, -1, 0), atol=1e-12)


def test_rotations_are_proper() -> None:
    rng = np.random.default_rng(3)
    for pos, (g, c, t) in itertools.product(PatientPosition, rng.uniform(0, 360, (10, 3))):
        r = beam_to_patient(g, c, t, pos)
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)


def test_source_position_and_arc() -> None:
    iso = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(source_position_mm(90.0, 0.0, 0.0, "HFS", iso), (1010.0, -20.0, 30.0), atol=1e-9)
    geo = ArcGeometry(arc=ArcSpec(), isocenter_mm=iso, position=PatientPosition.HFS, machine=MachineModel())
    rots, src = geo.sector_rotations(), geo.sources_mm()
    assert rots.shape == (180, 3, 3) and src.shape == (180, 3)
    np.testing.assert_allclose(np.linalg.norm(src - np.asarray(iso), axis=1), 1000.0)
    # 181 -> 179 CW in 180 sectors: the first sector centre is near 182 degrees, the source posterior and
    # slightly to the patient's right
    g0 = float(geo.gantry_angles_deg()[0])
    assert g0 == pytest.approx(181.0 + 0.5 * 358.0 / 180.0)
    np.testing.assert_allclose(src[0], source_position_mm(g0, 30.0, 0.0, "HFS", iso), atol=1e-9)
    assert src[0][1] - iso[1] > 990 and src[0][0] - iso[0] < 0


def test_bad_position_is_refused() -> None:
    with pytest.raises(ConfigError, match="HFDL"):
        beam_to_patient(0.0, 0.0, 0.0, "HFDL")
