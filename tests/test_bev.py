"""BEV projection: a small bright cube lands in the pixel that hand-derived geometry predicts; the numba
and torch back-ends agree (values and gradients); the adjoint is the transpose."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.case import Grid, PatientPosition
from core.errors import PlanningError
from core.machine import ArcSpec, BevGrid, MachineModel
from pipeline.bev import BevProjector
from pipeline.geometry import ArcGeometry

# Beam axes in the IEC fixed frame (x_f, y_f, z_f) at gantry 0/90/180/270, collimator 0, worked out by
# hand: the source (z_b) starts above the isocenter and turns towards +x_f; x_b is perpendicular to it
# in the gantry plane; y_b always points to the gantry.
FIXED_AXES = {  # gantry: (x_b, z_b)
    0: ((1, 0, 0), (0, 0, 1)),
    90: ((0, 0, -1), (1, 0, 0)),
    180: ((-1, 0, 0), (0, 0, -1)),
    270: ((0, 0, 1), (-1, 0, 0)),
}
# The fixed axes (x_f, y_f, z_f) in DICOM LPS for each patient position (couch 0): head first puts
# the head at the gantry (+y_f = +z), supine puts the anterior (-y) up, feet first / prone mirror.
FIXED_TO_LPS = {
    PatientPosition.HFS: ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    PatientPosition.FFS: ((-1, 0, 0), (0, 0, -1), (0, -1, 0)),
    PatientPosition.HFP: ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    PatientPosition.FFP: ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
}

ISO = (10.0, -20.0, 5.0)
OFFSET = (22.5, -12.5, 32.5)  # cube centre relative to the isocenter, mm (projects near pixel centres)


def _to_lps(vec_fixed: tuple[int, int, int], position: PatientPosition) -> np.ndarray:
    cols = np.array(FIXED_TO_LPS[position], dtype=float).T
    return cols @ np.asarray(vec_fixed, dtype=float)


def _expected_pixel(position: PatientPosition, gantry: int, collimator: int) -> tuple[int, int]:
    xb_f, zb_f = FIXED_AXES[gantry]
    yb_f = (0, 1, 0)
    xb, yb, zb = (_to_lps(v, position) for v in (xb_f, yb_f, zb_f))
    if collimator == 90:  # counter-clockwise seen from the source: x_b -> y_b, y_b -> -x_b
        xb, yb = yb, -xb
    p = np.asarray(OFFSET)
    mag = 1000.0 / (1000.0 - p @ zb)
    u, v = mag * (p @ xb), mag * (p @ yb)
    return math.floor((v + 100.0) / 5.0), math.floor((u + 100.0) / 5.0)


def _cube_grid() -> tuple[Grid, torch.Tensor]:
    n = 49
    h = 2.5
    origin = tuple(c - h * (n // 2) for c in ISO)
    grid = Grid(origin_mm=(origin[0], origin[1], origin[2]), spacing_mm=(h, h, h), shape=(n, n, n))
    vol = torch.zeros(grid.shape)
    i, j, k = (n // 2 + round(o / h) for o in OFFSET)
    vol[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 1.0
    return grid, vol


def _single_beam(gantry: float, collimator: float, position: PatientPosition) -> ArcGeometry:
    arc = ArcSpec(start_deg=(gantry - 1.0) % 360.0, stop_deg=(gantry + 1.0) % 360.0, n_sectors=1,
                  collimator_deg=collimator)
    return ArcGeometry(arc=arc, isocenter_mm=ISO, position=position, machine=MachineModel())


BACKENDS = ["numba", "torch"]


# every position and collimator on the default (numba) back-end, two on the torch one (the back-ends are
# compared on a general geometry below)
CUBE_CASES = [(p, c, "numba") for p in PatientPosition for c in (0, 90)] + [
    (PatientPosition.HFS, 90, "torch"), (PatientPosition.FFP, 0, "torch")]


@pytest.mark.parametrize(("position", "collimator", "backend"), CUBE_CASES)
def test_cube_lands_in_expected_pixel(position: PatientPosition, collimator: int, backend: str) -> None:
    grid, vol = _cube_grid()
    for gantry in (0, 90, 180, 270):
        proj = BevProjector(grid, _single_beam(gantry, collimator, position), depth_samples=96, backend=backend)
        bev = proj(vol)
        assert bev.shape == (1, 40, 40)
        r, c = np.unravel_index(int(torch.argmax(bev[0])), (40, 40))
        assert (r, c) == _expected_pixel(position, gantry, collimator), (position, gantry, collimator)
        # the cube is small: nothing lands far from it
        mask = torch.ones(40, 40, dtype=torch.bool)
        mask[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = False
        assert float(bev[0][mask].abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_along_ray_and_batch(backend: str) -> None:
    grid, vol = _cube_grid()
    geo = ArcGeometry(arc=ArcSpec(n_sectors=12), isocenter_mm=ISO, position=PatientPosition.HFS,
                      machine=MachineModel())
    proj = BevProjector(grid, geo, depth_samples=64, backend=backend)
    ones = torch.ones(grid.shape)
    b1 = proj(ones)
    assert float(b1.max()) <= 1.0 + 1e-5
    # at gantry 0 the central rays cross the cube-shaped grid over its whole depth range: a uniform
    # volume averages to (nearly) 1; obliquely the box's depth range is longer than the ray's chord
    b0 = BevProjector(grid, _single_beam(0, 0, PatientPosition.HFS), depth_samples=64, backend=backend)(ones)
    assert float(b0[:, 19:21, 19:21].min()) == pytest.approx(1.0, abs=0.03)
    assert float(b1[:, 19:21, 19:21].min()) < float(b0[:, 19:21, 19:21].min())
    batch = proj(torch.stack([ones, vol, 2.0 * vol]))
    assert batch.shape == (3, 12, 40, 40)
    torch.testing.assert_close(batch[0], b1)
    torch.testing.assert_close(batch[2], 2.0 * batch[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjoint_by_autograd(backend: str) -> None:
    grid, _ = _cube_grid()
    geo = ArcGeometry(arc=ArcSpec(n_sectors=4), isocenter_mm=ISO, position=PatientPosition.FFS,
                      machine=MachineModel())
    proj = BevProjector(grid, geo, depth_samples=32, dtype=torch.float64, backend=backend)
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(grid.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 40, 40, generator=gen, dtype=torch.float64)
    (proj(v) * w).sum().backward()
    assert v.grad is not None
    # linear operator: <P v, w> = <v, P^T w>
    assert float((proj(v.detach()) * w).sum()) == pytest.approx(float((v.detach() * v.grad).sum()), rel=1e-10)


def _oblique_case() -> tuple[Grid, ArcGeometry]:
    """A non-cubic, anisotropic grid whose box the isocenter is off-centre in, and a full arc."""
    grid = Grid(origin_mm=(-130.0, -95.0, -42.0), spacing_mm=(4.0, 3.0, 5.0), shape=(19, 61, 70))
    geo = ArcGeometry(arc=ArcSpec(n_sectors=36, collimator_deg=30.0), isocenter_mm=(12.0, -8.0, 3.0),
                      position=PatientPosition.HFP, machine=MachineModel())
    return grid, geo


def test_backends_agree_on_values_and_gradients() -> None:
    grid, geo = _oblique_case()
    gen = torch.Generator().manual_seed(1)
    vol = torch.rand((2, *grid.shape), generator=gen, dtype=torch.float64)
    w = torch.rand(2, geo.n_sectors, 40, 40, generator=gen, dtype=torch.float64)
    outs, grads = [], []
    for backend in BACKENDS:
        proj = BevProjector(grid, geo, depth_samples=48, dtype=torch.float64, backend=backend)
        v = vol.clone().requires_grad_(True)
        out = proj(v)
        (out * w).sum().backward()
        assert v.grad is not None
        outs.append(out.detach())
        grads.append(v.grad)
    # the rays leave the grid in most pixels: both the in-grid part and the zero part must match
    assert float((outs[0] == 0).float().mean()) > 0.05
    assert float((outs[0] > 0.1).float().mean()) > 0.3
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


def test_gradcheck_numba() -> None:
    grid = Grid(origin_mm=(-20.0, -25.0, -15.0), spacing_mm=(5.0, 5.0, 5.0), shape=(7, 11, 9))
    machine = MachineModel(bev=BevGrid(n_rows=5, n_cols=6, pixel_mm=5.0))  # a coarse BEV keeps it quick
    geo = ArcGeometry(arc=ArcSpec(n_sectors=3, collimator_deg=10.0), isocenter_mm=(0.0, 0.0, 0.0),
                      position=PatientPosition.HFS, machine=machine)
    proj = BevProjector(grid, geo, depth_samples=8, dtype=torch.float64, backend="numba")
    v = torch.rand(grid.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(proj, (v,), eps=1e-6, atol=1e-8)


def test_float32_and_inference_mode() -> None:
    grid, geo = _oblique_case()
    vol = torch.rand(grid.shape, generator=torch.Generator().manual_seed(2))
    ref = BevProjector(grid, geo, dtype=torch.float64, backend="torch")(vol.double())
    proj = BevProjector(grid, geo)
    assert proj.backend == "numba"
    with torch.inference_mode():
        out = proj(vol)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_bad_backend_is_refused() -> None:
    grid, geo = _oblique_case()
    with pytest.raises(PlanningError, match="backend"):
        BevProjector(grid, geo, backend="opencl")
    with pytest.raises(PlanningError, match="float32/float64"):
        BevProjector(grid, geo, backend="numba", dtype=torch.float16)
    with pytest.raises(PlanningError, match="does not match the grid"):
        BevProjector(grid, geo)(torch.zeros(3, 3, 3))
