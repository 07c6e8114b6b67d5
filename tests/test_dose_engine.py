"""The reference dose engine: generic 6 MV water data measured from the engine's own output, lung slab,
inverse square, linearity, gradients, the case helpers (grid, resampling, HU curve)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.case import Grid, PatientPosition, Role
from core.errors import ConfigError, InputError, PlanningError
from core.machine import ArcSpec, BevGrid, MachineModel
from pipeline.beam_model import load_beam_model
from pipeline.dose_engine import (
    ReferenceDoseEngine,
    RegionDose,
    autograd_adjoint,
    dose_grid_for_case,
    hu_to_density,
    resample_to_grid,
)
from pipeline.geometry import ArcGeometry

H = 2.0  # mm, phantom grid spacing
NX, NY, NZ = 101, 166, 61


def _phantom_grid(ssd_mm: float = 1000.0) -> Grid:
    """Water phantom below y = 0 (gantry 0 HFS looks along +y); the isocenter is at (0, 1000 - ssd, 0)."""
    return Grid(origin_mm=(-100.0, -9.0, -60.0), spacing_mm=(H, H, H), shape=(NZ, NY, NX))


def _slab_density(grid: Grid, slabs: tuple[tuple[float, float, float], ...] = ()) -> torch.Tensor:
    _, y, _ = grid.axes_mm()
    rho = np.where(y > 0.0, 1.0, 0.0)
    for lo, hi, value in slabs:
        rho = np.where((y > lo) & (y < hi), value, rho)
    return torch.as_tensor(np.broadcast_to(rho[None, :, None], grid.shape).copy(), dtype=torch.float32)


def _beam0(iso_y: float = 0.0) -> ArcGeometry:
    arc = ArcSpec(start_deg=359.0, stop_deg=1.0, n_sectors=1, collimator_deg=0.0)
    return ArcGeometry(arc=arc, isocenter_mm=(0.0, iso_y, 0.0), position=PatientPosition.HFS,
                       machine=MachineModel())


def _square(side_px: int) -> torch.Tensor:
    f = torch.zeros(1, 40, 40)
    a = 20 - side_px // 2
    f[0, a:a + side_px, a:a + side_px] = 1.0
    return f


@pytest.fixture(scope="module")
def water() -> ReferenceDoseEngine:
    grid = _phantom_grid()
    return ReferenceDoseEngine(_slab_density(grid), grid, _beam0(), load_beam_model(), lateral_mm=1.0)


def _cax(engine: ReferenceDoseEngine, fluence: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        dose = engine(fluence).numpy()
    _, y, _ = engine.grid.axes_mm()
    return y, dose[NZ // 2, :, NX // 2]


def test_depth_dose_and_calibration(water: ReferenceDoseEngine) -> None:
    y, cax = _cax(water, _square(20))
    i = int(np.argmax(cax))
    assert 13.0 <= y[i] <= 17.0
    pdd10 = 100.0 * np.interp(100.0, y, cax) / cax[i]
    assert 65.0 <= pdd10 <= 68.0
    # 1 MU of a 10 x 10 cm field at SSD 100 cm gives 1 cGy at d_max (grid sampling within 1.5 %)
    assert cax[i] == pytest.approx(0.01, rel=0.015)
    assert cax[2] < 0.6 * cax[i]  # build-up: the surface dose is well below the maximum


def test_penumbra_and_output_factors(water: ReferenceDoseEngine) -> None:
    with torch.no_grad():
        dose = water(_square(20)).numpy()
    x, y, _ = water.grid.axes_mm()
    k = int(np.argmin(abs(y - 100.0)))
    prof = dose[NZ // 2, k, :] / dose[NZ // 2, k, NX // 2]
    half = NX // 2
    xs, ps = x[half:], prof[half:]
    x80, x20 = np.interp(-0.8, -ps, xs), np.interp(-0.2, -ps, xs)
    assert 3.0 <= x20 - x80 <= 7.0
    # the 50 % point lies at the geometric field edge projected to 10 cm depth (50 mm x 1.1)
    assert np.interp(-0.5, -ps, xs) == pytest.approx(55.0, abs=1.5)
    out = {}
    for side in (10, 20, 40):
        yy, cax = _cax(water, _square(side))
        out[side] = (cax.max(), np.interp(100.0, yy, cax))
    assert out[10][0] < out[20][0] < out[40][0]
    assert out[10][1] < out[20][1] < out[40][1]
    # PDD rises with field size (more phantom scatter at depth)
    assert out[10][1] / out[10][0] < out[20][1] / out[20][0] < out[40][1] / out[40][0]


def test_inverse_square() -> None:
    beam = load_beam_model()
    grid = _phantom_grid()
    dens = _slab_density(grid)
    f = _square(40)
    d100 = _cax(ReferenceDoseEngine(dens, grid, _beam0(0.0), beam, lateral_mm=5.0), f)[1]
    # isocenter 100 mm below the surface: SSD 90 cm, same phantom
    d90 = _cax(ReferenceDoseEngine(dens, grid, _beam0(100.0), beam, lateral_mm=5.0), f)[1]
    y = grid.axes_mm()[1]
    for depth in (50.0, 150.0, 250.0):
        ratio = np.interp(depth, y, d90) / np.interp(depth, y, d100)
        expected = ((1000.0 + depth) / (900.0 + depth)) ** 2
        # a 20 x 20 field is 10 % smaller at the surface at SSD 90: scatter changes by ~1-2 %
        assert ratio == pytest.approx(expected, rel=0.03)


def test_lung_slab() -> None:
    beam = load_beam_model()
    grid = _phantom_grid()
    geo = _beam0()
    eng_w = ReferenceDoseEngine(_slab_density(grid), grid, geo, beam, lateral_mm=2.0)
    eng_l = ReferenceDoseEngine(_slab_density(grid, ((30.0, 130.0, 0.25),)), grid, geo, beam, lateral_mm=2.0)
    y = grid.axes_mm()[1]
    at = lambda d, depth: float(np.interp(depth, y, d))  # noqa: E731
    _, w10 = _cax(eng_w, _square(20))
    _, l10 = _cax(eng_l, _square(20))
    # less attenuation through 10 cm of lung: more dose behind the slab than in water
    assert at(l10, 160.0) > 1.1 * at(w10, 160.0)
    assert at(l10, 100.0) > at(w10, 100.0)
    # small field: lateral electron disequilibrium -> build-down inside the lung, build-up behind it
    _, w3 = _cax(eng_w, _square(6))
    _, l3 = _cax(eng_l, _square(6))
    rel3 = lambda depth: at(l3, depth) / at(w3, depth)  # noqa: E731
    rel10 = lambda depth: at(l10, depth) / at(w10, depth)  # noqa: E731
    assert rel3(26.0) == pytest.approx(1.0, abs=0.005)  # identical in front of the slab
    # the loss in lung is a small-field effect: relative to water, the 3 x 3 field keeps clearly less
    # dose in the lung than the 10 x 10 field does
    assert rel3(60.0) < rel10(60.0) - 0.05
    # and it recovers within ~1-2 cm of water behind the slab (re-build-up relative to water)
    assert rel3(150.0) > rel3(132.0) + 0.03
    assert abs(rel10(150.0) - rel10(132.0)) < 0.03


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_linearity_and_gradcheck(backend: str) -> None:
    # tiny problem in double precision: a 4 x 4 BEV (central leaf pairs), 3 control points
    machine = MachineModel(bev=BevGrid(n_rows=4, n_cols=4, pixel_mm=5.0), first_bev_leaf_pair=28)
    geo = ArcGeometry(arc=ArcSpec(start_deg=30.0, stop_deg=150.0, n_sectors=3, collimator_deg=30.0),
                      isocenter_mm=(0.0, 0.0, 0.0), position=PatientPosition.FFP, machine=machine)
    grid = Grid(origin_mm=(-30.0, -30.0, -20.0), spacing_mm=(6.0, 6.0, 10.0), shape=(5, 11, 11))
    gen = torch.Generator().manual_seed(1)
    dens = 0.2 + torch.rand(grid.shape, generator=gen, dtype=torch.float64)
    beam = replace(load_beam_model(), field_margin_mm=20.0)
    eng = ReferenceDoseEngine(dens, grid, geo, beam, dtype=torch.float64, lateral_mm=2.5, chunk=2, backend=backend)
    assert eng.backend == backend
    assert eng.ld_idx.numel() > 0  # the random density exercises the low-density channel too
    f1 = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    f2 = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(eng(2.0 * f1 - 0.5 * f2), 2.0 * eng(f1) - 0.5 * eng(f2))
        assert float(eng(f1).min()) >= 0.0 and float(eng(f1).max()) > 0.0
    fl = f1.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: eng(f).sum(dim=0), (fl,), eps=1e-6, atol=1e-8)


def test_shape_and_input_errors(water: ReferenceDoseEngine) -> None:
    with pytest.raises(PlanningError, match="fluence shape"):
        water(torch.zeros(2, 40, 40))
    grid = _phantom_grid()
    with pytest.raises(PlanningError, match="density"):
        ReferenceDoseEngine(-_slab_density(grid), grid, _beam0(), load_beam_model())
    with pytest.raises(ConfigError, match="scatter_weights"):
        replace(load_beam_model(), scatter_weights=(-1.0, 0.0))


def test_hu_to_density_and_resample() -> None:
    curve = ((-1000.0, 0.0), (0.0, 1.0), (1000.0, 1.5))
    np.testing.assert_allclose(hu_to_density(np.array([-2000.0, -500.0, 0.0, 500.0, 3000.0]), curve),
                               [0.0, 0.5, 1.0, 1.25, 1.5])
    with pytest.raises(InputError, match="increasing"):
        hu_to_density(np.zeros(3), ((0.0, 1.0), (0.0, 1.2)))
    src = Grid(origin_mm=(-10.0, -20.0, -30.0), spacing_mm=(1.0, 2.0, 3.0), shape=(21, 21, 21))
    x, y, z = src.axes_mm()
    lin = (x[None, None, :] + 2 * y[None, :, None] - 0.5 * z[:, None, None]).astype(np.float32)
    dst = Grid(origin_mm=(-7.3, -11.1, -20.2), spacing_mm=(2.4, 2.5, 2.5), shape=(8, 8, 8))
    xd, yd, zd = dst.axes_mm()
    out = resample_to_grid(lin, src, dst, order=1)
    np.testing.assert_allclose(out, xd[None, None, :] + 2 * yd[None, :, None] - 0.5 * zd[:, None, None], atol=1e-4)
    far = Grid(origin_mm=(100.0, 0.0, 0.0), spacing_mm=(1.0, 1.0, 1.0), shape=(2, 2, 2))
    assert (resample_to_grid(lin, src, far, fill=-1000.0) == -1000.0).all()
    np.testing.assert_array_equal(resample_to_grid(lin, src, src, order=0), lin)


def test_for_case_synthetic_pelvis() -> None:
    synth = pytest.importorskip("pipeline.synth")
    case = synth.synth_case(1)
    grid = dose_grid_for_case(case, 4.0)
    x, y, z = grid.axes_mm()
    body = case.masks[Role.BODY]
    cx, cy, cz = case.grid.axes_mm()
    kk = np.nonzero(case.masks[Role.PTV].any(axis=(1, 2)))[0]
    assert z[0] <= cz[kk.min()] - 45.0 and z[-1] >= cz[kk.max()] + 45.0  # PTV +- 50 mm (grid rounding)
    in_z = (cz >= z[0] - 2.0) & (cz <= z[-1] + 2.0)
    jj, ii = np.nonzero(body[in_z].any(axis=0))  # the body within the grid's slices
    assert x[0] <= cx[ii.min()] + 2.0 and x[-1] >= cx[ii.max()] - 2.0
    assert y[0] <= cy[jj.min()] + 2.0 and y[-1] >= cy[jj.max()] - 2.0
    geo = ArcGeometry(arc=ArcSpec(n_sectors=8), isocenter_mm=case.ptv_centroid_mm(),
                      position=case.patient_position, machine=MachineModel())
    curve = ((-1000.0, 0.001), (-800.0, 0.2), (0.0, 1.0), (200.0, 1.11), (1200.0, 1.69), (3000.0, 2.8))
    eng = ReferenceDoseEngine.for_case(case, geo, load_beam_model(), hu_curve=curve)
    assert eng.grid == grid and eng.density.shape == grid.shape
    fl = torch.zeros(8, 40, 40)
    fl[:, 16:24, 16:24] = 10.0
    with torch.no_grad():
        dose = eng(fl)
    ptv = resample_to_grid(case.masks[Role.PTV].astype(np.float32), case.grid, grid) >= 0.5
    body_dg = resample_to_grid(body.astype(np.float32), case.grid, grid) >= 0.5
    d = dose.numpy()
    assert d[ptv].mean() > 2.0 * d[body_dg & ~ptv].mean()  # the arc's fields meet in the PTV
    assert d[~body_dg].max() == 0.0  # dose only inside the body
    # the torch back-end (grid_sample, the CUDA path) gives the same dose and gradient as the numba one
    assert eng.backend == "numba"
    eng_t = ReferenceDoseEngine.for_case(case, geo, load_beam_model(), hu_curve=curve, backend="torch", chunk=3)
    gen = torch.Generator().manual_seed(3)
    fr = torch.rand(8, 40, 40, generator=gen)
    wt = torch.rand(grid.shape, generator=gen)
    out = []
    for e in (eng, eng_t):
        f = fr.clone().requires_grad_(True)
        dd = e(f)
        (dd * wt).sum().backward()
        out.append((dd.detach(), f.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5 * float(out[1][0].max()))
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-5 * float(out[1][1].abs().max()))
    with pytest.raises(PlanningError, match="backend"):
        ReferenceDoseEngine.for_case(case, geo, load_beam_model(), hu_curve=curve, backend="opencl")
    # a PTV-only engine gives the same dose in the PTV (nothing elsewhere) for a fraction of the voxels
    sub = eng.restricted(ptv)
    assert sub.points.shape[1] == int((ptv & body_dg).sum()) < eng.points.shape[1] // 10
    # its convolution lattices are cut to the PTV's projections (same nodes, fewer of them)
    assert sub.mat_u_fine.shape[1] < eng.mat_u_fine.shape[1] and sub.mat_v_coarse.shape[1] < eng.mat_v_coarse.shape[1]
    with torch.no_grad():
        d_sub = sub(fr).numpy()
        d_all = eng(fr).numpy()
    np.testing.assert_allclose(d_sub[ptv], d_all[ptv], rtol=1e-5, atol=1e-6 * float(d_all.max()))
    assert d_sub[~ptv].max() == 0.0 and d_sub[ptv].min() > 0.0
    # its dose as a vector over its voxels, and over a region's voxels (0 Gy where the region leaves the body)
    with torch.no_grad():
        np.testing.assert_allclose(sub.voxel_dose(fr).numpy(), d_all.reshape(-1)[sub.act_idx.numpy()], rtol=1e-5,
                                   atol=1e-6 * float(d_all.max()))
        region = ptv | ~body_dg
        vec = RegionDose(sub, ptv)(fr).numpy()
        np.testing.assert_allclose(vec, d_all[ptv], rtol=1e-5, atol=1e-6 * float(d_all.max()))
        wide = RegionDose(eng.restricted(region), region)(fr).numpy()
        np.testing.assert_allclose(wide, d_all[region], rtol=1e-5, atol=1e-6 * float(d_all.max()))
        assert wide[~body_dg[region]].max() == 0.0
    with pytest.raises(PlanningError, match="outside the region"):
        RegionDose(eng, ptv)
    # the adjoint: the numba engine's (no forward pass) is autograd's, for a mask and for voxel weights
    for weight in (torch.as_tensor(ptv), wt):
        expected = autograd_adjoint(eng_t, weight, eng.fluence_shape, device="cpu")
        for e in (eng, eng_t):
            torch.testing.assert_close(e.adjoint(weight), expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
        assert float(expected.max()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    grid = _phantom_grid()
    dens = _slab_density(grid)
    f = _square(20)
    cpu = ReferenceDoseEngine(dens, grid, _beam0(), load_beam_model())(f)
    gpu = ReferenceDoseEngine(dens, grid, _beam0(), load_beam_model(), device="cuda")(f.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


def _trace_phantom(dtype: torch.dtype) -> tuple[torch.Tensor, Grid, ArcGeometry, np.ndarray]:
    """An elliptic water body with a lung-like and a bone-like insert and noise, in air (the numba trace's
    zero padding, surface and low-density recursion are all exercised), 12 control points."""
    grid = Grid(origin_mm=(-64.0, -48.0, -30.0), spacing_mm=(4.0, 4.0, 5.0), shape=(13, 25, 33))
    x, y, z = grid.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    body = (xx / 60.0) ** 2 + (yy / 40.0) ** 2 <= 1.0
    rho = np.where(body, 1.0, 0.001)
    rho = np.where(((xx - 20.0) / 18.0) ** 2 + (yy / 14.0) ** 2 + (zz / 20.0) ** 2 <= 1.0, 0.2, rho)
    rho = np.where((np.abs(xx + 25.0) < 6.0) & (np.abs(yy) < 10.0), 1.6, rho)
    rho = rho * (1.0 + 0.1 * np.random.default_rng(5).random(grid.shape)) * body + np.where(body, 0.0, rho)
    machine = MachineModel(bev=BevGrid(n_rows=10, n_cols=12, pixel_mm=5.0), first_bev_leaf_pair=25)
    geo = ArcGeometry(arc=ArcSpec(start_deg=181.0, stop_deg=179.0, n_sectors=12, collimator_deg=15.0),
                      isocenter_mm=(6.0, -3.0, 2.0), position=PatientPosition.HFS, machine=machine)
    return torch.as_tensor(rho, dtype=dtype), grid, geo, body


def test_numba_trace_matches_torch_trace() -> None:
    """The CPU trace (numba kernel) stores the torch trace's buffers and gives its dose.

    float64: every buffer to 1e-10 (both compute the same arithmetic; measured differences ~1e-13) and
    the same low-density voxels. float32: the numba trace computes positions, depths and the recursion
    in float64, so it is compared with the float64 torch trace (buffers to 2e-5 absolute on values <= 2)
    and with the float32 one through the dose (1e-4 of the maximum)."""
    beam = replace(load_beam_model(), field_margin_mm=20.0)
    engines = {}
    for dtype in (torch.float64, torch.float32):
        dens, grid, geo, body = _trace_phantom(dtype)
        for backend in ("numba", "torch"):
            engines[backend, dtype] = ReferenceDoseEngine(dens, grid, geo, beam, dtype=dtype, active=body,
                                                          lateral_mm=2.5, chunk=5, backend=backend)
    names = ("grid_xy", "weights", "ld_grid", "ld_weights")
    ref = engines["torch", torch.float64]
    assert 0 < ref.ld_idx.numel() < ref.points.shape[1]  # the insert is low density, the rest is not
    for name in names:
        torch.testing.assert_close(getattr(engines["numba", torch.float64], name), getattr(ref, name), rtol=0.0,
                                   atol=1e-10, msg=name)
    assert torch.equal(engines["numba", torch.float64].ld_idx, ref.ld_idx)
    single = engines["numba", torch.float32]
    assert torch.equal(single.ld_idx, ref.ld_idx) and torch.equal(single.ld_idx, engines["torch", torch.float32].ld_idx)
    for name in names:
        torch.testing.assert_close(getattr(single, name).double(), getattr(ref, name), rtol=0.0, atol=2e-5, msg=name)
    gen = torch.Generator().manual_seed(4)
    fl = torch.rand(ref.fluence_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        dose = {key: e(fl).double() for key, e in engines.items()}
    top = float(dose["torch", torch.float64].max())
    assert top > 0.0
    torch.testing.assert_close(dose["numba", torch.float64], dose["torch", torch.float64], rtol=0.0, atol=1e-12 * top)
    torch.testing.assert_close(dose["numba", torch.float32], dose["torch", torch.float64], rtol=0.0, atol=1e-5 * top)
    torch.testing.assert_close(dose["numba", torch.float32], dose["torch", torch.float32], rtol=0.0, atol=1e-4 * top)


def test_convolution_matrices_hold_no_denormal_numbers(water: ReferenceDoseEngine) -> None:
    # float32 denormals made the CPU's convolutions about eight times slower; the tails cut to 0 are
    # a share below BOX_GAUSS_FLOOR of a node's Gaussian, so every row sums as before to 1e-10
    from scipy.special import ndtr

    from pipeline.dose_engine import BOX_GAUSS_FLOOR, _box_gauss_matrix

    nodes = np.linspace(-150.0, 150.0, 121)
    edges = np.linspace(-100.0, 100.0, 41)
    for sigma in (1.5, 4.0, 30.0):
        m = _box_gauss_matrix(nodes, edges, sigma)
        cdf = ndtr((edges[None, :] - nodes[:, None]) / sigma)
        exact = cdf[:, 1:] - cdf[:, :-1]
        assert ((m == 0.0) | (m >= BOX_GAUSS_FLOOR)).all() and (m == 0.0).any()
        np.testing.assert_allclose(m.sum(axis=1), exact.sum(axis=1), rtol=0, atol=40 * BOX_GAUSS_FLOOR)
    tiny = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
    for name in ("mat_u_fine", "mat_v_fine", "mat_u_coarse", "mat_v_coarse"):
        mat = getattr(water, name)
        assert not bool(((mat != 0) & (mat.abs() < tiny)).any()), name


def test_restricted_engine_doses_adjacent_sectors_together() -> None:
    # the arc stage's engine with sectors_per_beam = 2: one beam at the mean angle of every two sectors,
    # dosing their summed fluence; close to the sector-by-sector dose, not equal to it
    from core.case import DEFAULT_HU_TO_DENSITY

    synth = pytest.importorskip("pipeline.synth")
    case = synth.synth_case(1)
    geo = ArcGeometry(arc=ArcSpec(), isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                      machine=MachineModel())
    eng = ReferenceDoseEngine.for_case(case, geo, load_beam_model(), hu_curve=DEFAULT_HU_TO_DENSITY)
    ptv = resample_to_grid(case.masks[Role.PTV].astype(np.float32), case.grid, eng.grid) >= 0.5
    every = eng.restricted(ptv)
    pairs = eng.restricted(ptv, sectors_per_beam=2)
    assert pairs.fluence_shape == (90, 40, 40) and every.fluence_shape == (180, 40, 40)
    a = eng.geometry.gantry_angles_deg()
    mean_angle = (a[0::2] + ((a[1::2] - a[0::2] + 180.0) % 360.0 - 180.0) / 2.0) % 360.0
    np.testing.assert_allclose(pairs.geometry.gantry_angles_deg(), mean_angle, atol=1e-9)
    gen = torch.Generator().manual_seed(4)
    fl = torch.zeros(180, 40, 40)
    fl[:, 14:26, 13:27] = 1.0 + torch.rand(180, 12, 14, generator=gen)  # modulated, different in every sector
    with torch.no_grad():
        exact = RegionDose(every, ptv)(fl)
        merged = RegionDose(pairs, ptv, sectors_per_beam=2)(fl)
        summed = pairs.voxel_dose(fl.reshape(90, 2, 40, 40).sum(dim=1))
    torch.testing.assert_close(merged, summed)
    diff = float((merged - exact).abs().max())
    assert 0.0 < diff <= 0.01 * float(exact.max())
    # the gradient reaches both sectors of a beam equally (the adjoint of the sum)
    f = fl.clone().requires_grad_(True)
    RegionDose(pairs, ptv, sectors_per_beam=2)(f).sum().backward()
    assert f.grad is not None
    torch.testing.assert_close(f.grad[0::2], f.grad[1::2])
    with pytest.raises(PlanningError, match="divide"):
        eng.restricted(ptv, sectors_per_beam=7)
    with pytest.raises(PlanningError, match="beams"):
        RegionDose(pairs, ptv, sectors_per_beam=2)(fl[:90])
    with pytest.raises(PlanningError, match="sectors_per_beam"):
        RegionDose(pairs, ptv, sectors_per_beam=0)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_reads_only_the_slab_it_needs(order: int) -> None:
    # the source is cut to the slab the destination reads before the interpolation: the same values as
    # interpolating the whole volume, for grids inside, across the edges and partly outside the source
    from scipy import ndimage

    gen = np.random.default_rng(5)
    src = Grid(origin_mm=(-40.0, -30.0, -60.0), spacing_mm=(0.9, 1.1, 2.5), shape=(50, 60, 70))
    vol = gen.normal(size=src.shape).astype(np.float32)
    for dst in (Grid(origin_mm=(-20.0, -10.0, -30.0), spacing_mm=(4.0, 4.0, 4.0), shape=(6, 7, 8)),
                Grid(origin_mm=(-45.0, -33.0, -70.0), spacing_mm=(4.0, 4.0, 4.0), shape=(40, 20, 20)),
                Grid(origin_mm=(20.0, 20.0, 50.0), spacing_mm=(3.0, 2.0, 2.5), shape=(9, 9, 9))):
        scale = [dst.spacing_mm[a] / src.spacing_mm[a] for a in (2, 1, 0)]
        offset = [(dst.origin_mm[a] - src.origin_mm[a]) / src.spacing_mm[a] for a in (2, 1, 0)]
        whole = ndimage.affine_transform(vol, np.asarray(scale), offset=offset, output_shape=dst.shape, order=order,
                                         mode="nearest")
        out = resample_to_grid(vol, src, dst, order=order, fill=7.0)
        kept = out != 7.0
        inside = np.ones(dst.shape, dtype=bool)  # centres within half a source voxel of the source
        for ax in range(3):
            idx = offset[ax] + scale[ax] * np.arange(dst.shape[ax])
            ok = (idx >= -0.5 - 1e-6) & (idx <= src.shape[ax] - 0.5 + 1e-6)
            inside &= ok.reshape([-1 if a == ax else 1 for a in range(3)])
        np.testing.assert_array_equal(kept, inside)
        assert kept.any()
        np.testing.assert_allclose(out[kept], whole[kept], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_depth_weights_cap_changes_no_value_and_leaves_no_denormal(dtype: torch.dtype) -> None:
    # the build-up exponentials are capped at exp(-EXP_ARG_MAX): the same weights as the plain formula
    # to the last bit at every depth, without the float32 denormal values that made them slow
    beam = load_beam_model()
    d = torch.linspace(0.0, 800.0, 20001, dtype=dtype)
    got = beam.depth_weights(d)
    a = beam.attenuation(d)
    plain = ((1.0 - (1.0 - beam.surface_fraction) * torch.exp(-d / beam.buildup_mm)) * a,
             beam.scatter_weights[0] * (-torch.expm1(-d / beam.scatter_buildup_mm[0])) * a,
             beam.scatter_weights[1] * (-torch.expm1(-d / beam.scatter_buildup_mm[1])) * a)
    tiny = torch.finfo(dtype).tiny
    for g, p in zip(got, plain, strict=True):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
        assert not bool(((g != 0) & (g.abs() < tiny)).any())
    assert float(d.max()) / beam.buildup_mm > 80.0  # the cap is reached in this range


@pytest.mark.parametrize("order", [0, 1])
def test_resample_of_masks_and_integer_ct_equals_their_float_copies(order: int) -> None:
    """Masks (bool) and integer CT numbers are read as they are, without a float copy of the slab: the result
    must be what resampling their float32 copies gives, bit for bit."""
    gen = np.random.default_rng(11)
    src = Grid(origin_mm=(-40.0, -30.0, -60.0), spacing_mm=(0.9, 1.1, 2.5), shape=(30, 40, 50))
    dst = Grid(origin_mm=(-45.0, -33.0, -70.0), spacing_mm=(4.0, 4.0, 4.0), shape=(22, 12, 13))
    mask = gen.random(src.shape) < 0.3
    hu = gen.integers(-1024, 3000, src.shape).astype(np.int16)
    for vol in (mask, hu, hu.astype(np.uint16) // 2, mask.astype(np.uint8)):
        got = resample_to_grid(vol, src, dst, order=order, fill=-1000.0)
        want = resample_to_grid(vol.astype(np.float32), src, dst, order=order, fill=-1000.0)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
