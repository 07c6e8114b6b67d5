"""Objectives (paper eq. 7-12) against autograd, and the fluence optimizer on a toy linear arc."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from core.case import Grid
from core.errors import InputError, PlanningError
from pipeline import objectives as obj
from pipeline.dose_engine import autograd_adjoint
from pipeline.dvh import dose_at_volume_percent, homogeneity_index
from pipeline.goals import normalisation_factor
from pipeline.optimizer import OptimizerWeights, optimize_fluence, ptv_aperture

torch.set_num_threads(2)


# --------------------------------------------------------------------------- Err map vs autograd


def _random_case(seed: int, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (6, 7, 8)
    dose = 8.0 * torch.rand((*batch, *shape), generator=g, dtype=torch.float64) * 1.5
    masks = {
        "ptv": torch.rand(shape, generator=g) < 0.4,
        "bladder": torch.rand(shape, generator=g) < 0.3,  # overlaps the PTV in places, as in real cases
        "rectum": torch.rand(shape, generator=g, dtype=torch.float64),  # soft weights
    }
    return dose, masks


@pytest.mark.parametrize("batch", [(), (3,)])
def test_err_map_is_the_gradient_of_the_objective(batch: tuple[int, ...]) -> None:
    dose, masks = _random_case(1, batch)
    dose0 = dose.detach() * 1.1 + 0.5
    sparing = {"bladder": 0.3, "rectum": 0.1, "femur_head_l": 0.2}  # femur absent: ignored
    d = dose.clone().requires_grad_(True)
    j = obj.dose_objective(d, masks, 8.0, 3.0, 1.0, sparing, dose0)
    (grad,) = torch.autograd.grad(j, d)
    e = obj.err_map(dose, masks, 8.0, 3.0, 1.0, sparing, dose0)
    assert e.shape == dose.shape
    torch.testing.assert_close(e, grad)


def test_err_map_closed_form_values() -> None:
    dose = torch.tensor([[[6.0, 8.0, 10.0, 3.0]]], dtype=torch.float64)
    ptv = torch.tensor([[[True, True, True, False]]])
    oar = torch.tensor([[[False, False, True, True]]])
    e = obj.err_map(dose, {"ptv": ptv, "rectum": oar}, 8.0, 2.0, 0.5, {"rectum": 0.25}, None)
    # PTV: l- (Rx - D) below, l+ (D - Rx) above; OAR with D0 = D: s D.
    expected = torch.tensor([[[-0.5 * 2.0, 0.0, 2.0 * 2.0 + 0.25 * 10.0, 0.25 * 3.0]]], dtype=torch.float64)
    torch.testing.assert_close(e, expected)


def test_zero_sparing_adds_nothing_at_the_baseline() -> None:
    dose, masks = _random_case(2)
    e0 = obj.err_map(dose, masks, 8.0, 2.0, 1.0)
    e1 = obj.err_map(dose, masks, 8.0, 2.0, 1.0, {"bladder": 0.0, "rectum": 0.0}, dose)
    torch.testing.assert_close(e0, e1)
    with pytest.raises(InputError):
        obj.err_map(dose, masks, 8.0, 2.0, 1.0, {"bladder": 1.2}, dose)
    with pytest.raises(InputError):
        obj.err_map(dose, {"bladder": masks["bladder"]}, 8.0, 2.0, 1.0)


def test_dose_volume_terms_push_only_on_the_tail() -> None:
    dose = torch.linspace(0.0, 10.0, 100, dtype=torch.float64).requires_grad_(True)
    # Hottest 10 % (9.09..10 Gy) above a 9.5 Gy limit.
    j = obj.upper_tail_of(dose, 9.5, 0.1, 10.0)
    (g,) = torch.autograd.grad(j, dose)
    nz = torch.nonzero(g.reshape(-1)).reshape(-1)
    assert nz.numel() > 0 and bool((dose.reshape(-1)[nz] > 9.5).all()) and bool((g >= 0).all())
    # Coldest 5 % below 0.3 Gy: a negative gradient (raise them) on those voxels only.
    j = obj.lower_tail_of(dose, 0.3, 0.05, 10.0)
    (g,) = torch.autograd.grad(j, dose)
    nz = torch.nonzero(g.reshape(-1)).reshape(-1)
    assert nz.numel() > 0 and bool((dose.reshape(-1)[nz] < 0.3).all()) and bool((g <= 0).all())


def test_fluence_shape_terms() -> None:
    flat = torch.zeros(4, 6, 10)
    flat[:, 1:5, 2:8] = 3.0
    assert float(obj.two_level_term(flat)) == pytest.approx(0.0)
    ramped = flat.clone()
    ramped[:, 2, 2:8] = torch.linspace(1.0, 5.0, 6)
    assert float(obj.two_level_term(ramped)) > 1e-3
    const = torch.full((4, 6, 10), 2.0)
    assert float(obj.smoothness_term(const, 2.0)) == 0.0
    assert float(obj.smoothness_term(flat, 3.0)) > 0.0
    assert float(obj.total_variation_term(ramped, 3.0)) > float(obj.total_variation_term(flat, 3.0))


def test_falloff_reference_decreases_away_from_the_ptv() -> None:
    ptv = np.zeros((20, 20, 40), bool)
    ptv[8:12, 8:12, 8:12] = True
    ref = obj.falloff_reference(ptv, (4.0, 4.0, 4.0), 8.0, floor_fraction=0.25, falloff_mm=15.0)
    row = ref[10, 10, 12:]
    assert ref[10, 10, 10] == pytest.approx(8.0 * 1.05)
    assert np.all(np.diff(row) < 0) and row[-1] > 8.0 * 0.25
    # 4 mm from the surface: floor + (1.05 - floor) exp(-4/15).
    assert ref[10, 10, 12] == pytest.approx(8.0 * (0.25 + 0.8 * math.exp(-4.0 / 15.0)), rel=1e-5)


# --------------------------------------------------------------------------- a toy linear arc


class ToyArc(torch.nn.Module):
    """A small coplanar arc of parallel beams: linear, differentiable, with attenuation and blur.

    Map row r covers z slices [2r, 2r + 2); map column c covers a 2-voxel lateral band; the beam of
    sector k enters from angle 2 pi k / n and is attenuated exponentially with depth, then blurred
    (a crude scatter) by a 3x3x3 box filter.
    """

    lat: torch.Tensor
    att: torch.Tensor

    def __init__(self, n_sectors: int = 12, n: int = 24, rows: int = 12, cols: int = 12) -> None:
        super().__init__()
        self.fluence_shape = (n_sectors, rows, cols)
        self.n = n
        self.grid = Grid(origin_mm=(0.0, 0.0, 0.0), spacing_mm=(4.0, 4.0, 4.0), shape=(n, n, n))
        self.device = torch.device("cpu")
        self.keep: torch.Tensor | None = None
        c = (n - 1) / 2.0
        y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32) - c, torch.arange(n, dtype=torch.float32) - c,
                              indexing="ij")
        grids = []
        atten = []
        for k in range(n_sectors):
            th = 2 * math.pi * k / n_sectors
            u = x * math.cos(th) + y * math.sin(th)  # lateral, voxels
            t = -x * math.sin(th) + y * math.cos(th)  # depth axis, voxels (beam enters at t = -n/2)
            grids.append(torch.stack([u / (n / 2), torch.zeros_like(u)], dim=-1))
            atten.append(torch.exp(-0.04 * (t + n / 2)))
        self.register_buffer("lat", torch.stack(grids))  # (S, n, n, 2) in [-1, 1] across the map width
        self.register_buffer("att", torch.stack(atten))  # (S, n, n)

    def forward(self, fluence: torch.Tensor) -> torch.Tensor:
        s, rows, _cols = fluence.shape
        nz = self.n
        zidx = torch.clamp(torch.arange(nz) * rows // nz, max=rows - 1)  # row r -> slices [2r, 2r + 2)
        img = fluence[:, zidx, :].unsqueeze(1)  # (S, 1, nz, cols): one lateral profile per slice
        zc = (2 * torch.arange(nz, dtype=fluence.dtype) + 1) / nz - 1  # slice centres, normalised
        lat = self.lat[..., 0].reshape(s, 1, -1).expand(s, nz, -1)
        grid = torch.stack([lat, zc.view(1, nz, 1).expand_as(lat)], dim=-1)  # (S, nz, n*n, 2)
        v = torch.nn.functional.grid_sample(img, grid, align_corners=False, padding_mode="zeros")
        dose = (v.reshape(s, nz, self.n, self.n) * self.att.unsqueeze(1)).sum(0)  # (nz, n, n)
        dose = torch.nn.functional.avg_pool3d(dose[None, None], 3, stride=1, padding=1)[0, 0]
        return 0.01 * dose if self.keep is None else 0.01 * dose * self.keep

    def restricted(self, mask: np.ndarray) -> ToyArc:
        """The same arc with dose only in ``mask`` (the DoseEngine protocol)."""
        sub = ToyArc(self.fluence_shape[0], self.n, self.fluence_shape[1], self.fluence_shape[2])
        sub.keep = torch.as_tensor(mask, dtype=torch.float32)
        return sub

    def adjoint(self, weight: torch.Tensor) -> torch.Tensor:
        """``A^T w`` (the DoseEngine protocol), by autograd."""
        return autograd_adjoint(self, weight, self.fluence_shape, device=self.device)


def toy_masks(n: int = 24) -> dict[str, torch.Tensor]:
    k, j, i = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
    c = (n - 1) / 2.0
    ptv = ((k - 10.0) ** 2 + (j - c) ** 2 + (i - c) ** 2) <= 4.5**2
    rectum = ((j - (c + 6.5)) ** 2 + (i - c) ** 2 <= 2.5**2) & (k >= 5) & (k <= 15)
    bladder = ((k - 10.0) ** 2 + (j - (c - 7.0)) ** 2 + (i - c) ** 2) <= 3.5**2
    body = (j - c) ** 2 + (i - c) ** 2 <= 11.0**2
    return {"ptv": ptv, "rectum": rectum, "bladder": bladder, "body": body}


def test_toy_arc_is_linear() -> None:
    eng = ToyArc()
    g = torch.Generator().manual_seed(0)
    a = torch.rand(eng.fluence_shape, generator=g)
    b = torch.rand(eng.fluence_shape, generator=g)
    torch.testing.assert_close(eng(2 * a + 3 * b), 2 * eng(a) + 3 * eng(b), rtol=1e-5, atol=1e-6)


def test_aperture_covers_the_ptv_projection() -> None:
    eng = ToyArc()
    masks = toy_masks()
    ap, adj = ptv_aperture(eng, masks["ptv"], eng.fluence_shape, threshold=0.3,
                           device=torch.device("cpu"), dtype=torch.float32)
    assert ap.shape == eng.fluence_shape
    # The PTV (z 5.5..14.5, radius 4.5 voxels) sits in rows 3..7 and the central columns in every map.
    assert bool(ap[:, 5, 5:7].all())
    assert not bool(ap[:, 0].any()) and not bool(ap[:, :, 0].any())
    assert bool((adj >= 0).all())


def _normalised_metrics(dose: np.ndarray, masks: Mapping[Any, torch.Tensor], rx: float) -> dict[str, float]:
    ptv = masks["ptv"].numpy()
    f = normalisation_factor(dose, ptv, rx_gy=rx, mode="ptv_dx", volume_percent=95.0)
    d = dose * f
    return {
        "HI": homogeneity_index(d, ptv),
        "D98": dose_at_volume_percent(d, ptv, 98.0) / rx,
        "rectum": float(d[masks["rectum"].numpy() & ~ptv].mean()),
        "bladder": float(d[masks["bladder"].numpy() & ~ptv].mean()),
    }


def test_optimizer_improves_on_the_open_aperture_plan() -> None:
    eng = ToyArc()
    masks = toy_masks()
    rx = 8.0
    calls: list[tuple[int, int, float]] = []
    res = optimize_fluence(eng, masks, rx_gy=rx, iterations=120, progress=lambda i, n, v: calls.append((i, n, v)))
    assert len(res.history) == 120 and len(calls) == 120 and calls[-1][:2] == (120, 120)
    assert res.history[-1] < 0.5 * res.history[0]
    assert res.fluence.shape == eng.fluence_shape and res.fluence.dtype == np.float32
    assert float(res.fluence.min()) >= 0.0
    # Zero outside the dilated PTV aperture.
    assert float(np.abs(res.fluence[:, 0]).max()) == 0.0
    torch.testing.assert_close(torch.as_tensor(res.dose), eng(torch.as_tensor(res.fluence)), rtol=1e-4, atol=1e-5)

    # The starting plan: flat fluence over the aperture (what a single iteration barely changes).
    start = optimize_fluence(eng, masks, rx_gy=rx, iterations=1)
    m0 = _normalised_metrics(start.dose, masks, rx)
    m1 = _normalised_metrics(res.dose, masks, rx)
    assert m1["HI"] < m0["HI"]
    assert m1["D98"] >= 0.95
    assert m1["rectum"] < m0["rectum"] and m1["bladder"] < m0["bladder"]


def test_optimizer_refuses_bad_input() -> None:
    eng = ToyArc()
    masks = toy_masks()
    with pytest.raises(PlanningError, match="PTV"):
        optimize_fluence(eng, {"bladder": masks["bladder"]}, rx_gy=8.0, iterations=2)
    with pytest.raises(PlanningError, match="empty"):
        optimize_fluence(eng, {"ptv": torch.zeros_like(masks["ptv"])}, rx_gy=8.0, iterations=2)
    with pytest.raises(PlanningError):
        optimize_fluence(eng, masks, rx_gy=0.0, iterations=2)
    with pytest.raises(PlanningError):
        OptimizerWeights(learning_rate=0.0)


def test_lbfgs_and_time_limit() -> None:
    eng = ToyArc()
    masks = toy_masks()
    res = optimize_fluence(eng, masks, rx_gy=8.0, iterations=30, method="lbfgs")
    assert res.history[-1] < 0.5 * res.history[0]
    assert float(res.fluence.min()) >= 0.0
    short = optimize_fluence(eng, masks, rx_gy=8.0, iterations=500, time_limit_s=0.0)
    assert len(short.history) == 1
    with pytest.raises(PlanningError, match="method"):
        optimize_fluence(eng, masks, rx_gy=8.0, iterations=2, method="sgd")


def test_optimizer_on_a_synthetic_pelvis_with_the_reference_engine() -> None:
    """The real engine on a cheap configuration (36 sectors, 8 mm grid, a few seconds).

    The optimizer must beat its open-aperture start and reach the issue's PTV targets (HI <= 0.10,
    D98 >= 97 % of Rx at PTV D95 = Rx) on this configuration; the full 180-sector 4 mm case is measured
    by ``benchmarks.bench_optimizer``.
    """
    dose_engine = pytest.importorskip("pipeline.dose_engine")
    synth = pytest.importorskip("pipeline.synth")
    from dataclasses import replace

    from appliance.config import Settings
    from core.case import Role
    from pipeline.beam_model import load_beam_model
    from pipeline.geometry import ArcGeometry

    st = Settings()
    case = synth.synth_case(3, spacing_mm=(4.0, 4.0, 4.0))
    arc = replace(st.machine.arc(), n_sectors=36)
    geometry = ArcGeometry(arc=arc, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                           machine=st.machine.model())
    engine = dose_engine.ReferenceDoseEngine.for_case(case, geometry, load_beam_model(),
                                                      hu_curve=st.planning.hu_to_density, spacing_mm=8.0)
    masks = {
        role: torch.as_tensor(dose_engine.resample_to_grid(m.astype(np.float32), case.grid, engine.grid, order=1) >= 0.5)
        for role, m in case.masks.items()
    }
    rx = case.prescription.dose_gy / case.prescription.fractions
    start = optimize_fluence(engine, masks, rx_gy=rx, iterations=1)
    res = optimize_fluence(engine, masks, rx_gy=rx, iterations=30)
    assert res.fluence.shape == (36, 40, 40)
    assert res.history[-1] < 0.5 * res.history[0]
    m0 = _normalised_metrics(start.dose, masks, rx)
    m1 = _normalised_metrics(res.dose, masks, rx)
    assert m1["HI"] < m0["HI"] and m1["HI"] <= 0.10
    assert m1["D98"] >= 0.97
    assert m1["rectum"] < m0["rectum"] and m1["bladder"] < m0["bladder"]
    assert Role.PTV in masks
