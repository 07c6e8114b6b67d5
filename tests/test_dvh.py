"""DVH metrics, clinical goals and MU normalisation against analytic cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InputError, PlanningError
from pipeline.dvh import (
    METRIC_RE,
    cumulative_dvh,
    dose_at_volume_cc,
    dose_at_volume_percent,
    evaluate_metric,
    homogeneity_index,
    metric_unit,
    paddick_ci,
    structure_metrics,
    volume_at_dose,
    volume_cc,
)
from pipeline.goals import GoalSpec, evaluate_goals_on_masks, normalisation_factor

N = 50  # voxels along the ramp


def ramp_cube(top_gy: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """A 50^3 cube whose dose rises linearly along x from 0 to ``top_gy`` (voxel centres sample it)."""
    x = (np.arange(N) + 0.5) / N * top_gy
    dose = np.broadcast_to(x[None, None, :], (N, N, N)).copy()
    return dose, np.ones_like(dose, dtype=bool)


def sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], r: float) -> np.ndarray:
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= r * r


# --------------------------------------------------------------------------- analytic DVH cases


def test_uniform_dose_metrics() -> None:
    dose = np.full((10, 12, 14), 7.25)
    mask = np.zeros(dose.shape, bool)
    mask[2:8, 3:9, 4:10] = True
    m = structure_metrics(dose, mask, 0.064, rx_gy=7.25, target=True)
    for key in ("Dmean_Gy", "Dmin_Gy", "Dmax_Gy", "D2_Gy", "D50_Gy", "D95_Gy", "D98_Gy", "D2cc_Gy"):
        assert m[key] == pytest.approx(7.25)
    assert m["HI"] == pytest.approx(0.0)
    assert m["volume_cm3"] == pytest.approx(216 * 0.064)
    assert m["V_rx_percent"] == pytest.approx(100.0)
    assert volume_at_dose(dose, mask, 7.2) == pytest.approx(100.0)
    assert volume_at_dose(dose, mask, 7.3) == pytest.approx(0.0)


def test_linear_ramp_quantiles_are_closed_form() -> None:
    top = 40.0
    dose, mask = ramp_cube(top)
    # D_x% of a dose uniform on [0, top] is top * (1 - x/100).
    for x in (2.0, 5.0, 25.0, 50.0, 95.0, 98.0):
        assert dose_at_volume_percent(dose, mask, x) == pytest.approx(top * (1 - x / 100), abs=1e-9)
    m = structure_metrics(dose, mask, 0.001, rx_gy=top / 2)
    assert m["D50_Gy"] == pytest.approx(20.0)
    assert m["D98_Gy"] == pytest.approx(0.8)
    assert m["D2_Gy"] == pytest.approx(39.2)
    assert m["Dmean_Gy"] == pytest.approx(20.0)
    assert m["HI"] == pytest.approx((39.2 - 0.8) / 20.0)
    assert homogeneity_index(dose, mask) == pytest.approx(1.92)


def test_linear_ramp_volumes() -> None:
    dose, mask = ramp_cube(40.0)
    # Continuous answer V_x = 100 (1 - x / 40) %; the step DVH is within one voxel slab (100/N %).
    assert volume_at_dose(dose, mask, 20.0) == pytest.approx(50.0, abs=100 / N)
    for x in (4.0, 10.0, 33.0):
        assert volume_at_dose(dose, mask, x) == pytest.approx(100 * (1 - x / 40), abs=100 / N)
    voxel_cc = 0.008
    total_cc = N**3 * voxel_cc
    assert evaluate_metric("V20Gycc", dose, mask, voxel_cc, rx_gy=40) == pytest.approx(total_cc / 2, rel=0.03)
    # D of the hottest 10 cm3 of a 1000 cm3 ramp: top * (1 - 10/1000).
    assert dose_at_volume_cc(dose, mask, 10.0, voxel_cc) == pytest.approx(40.0 * 0.99, abs=1e-9)
    assert evaluate_metric("D10cc", dose, mask, voxel_cc, rx_gy=40) == pytest.approx(39.6, abs=1e-9)
    # Larger than the structure: its minimum dose.
    assert dose_at_volume_cc(dose, mask, 5000.0, voxel_cc) == pytest.approx(dose.min())


def test_cumulative_dvh_matches_step_volumes() -> None:
    dose, mask = ramp_cube(10.0)
    bins, vol = cumulative_dvh(dose, mask, bin_gy=0.01)
    assert bins[0] == 0.0 and vol[0] == pytest.approx(100.0)
    assert vol[-1] == 0.0 and bins[-1] > dose.max()
    assert np.all(np.diff(vol) <= 1e-12)
    for b in (1.0, 2.5, 7.77):
        idx = round(b / 0.01)
        assert vol[idx] == pytest.approx(volume_at_dose(dose, mask, bins[idx]))
    with pytest.raises(InputError):
        cumulative_dvh(dose, mask, bin_gy=0.0)


def test_voxel_fraction_weighting() -> None:
    dose, _ = ramp_cube(40.0)
    half = np.full(dose.shape, 0.5)
    # Uniform weights change no relative metric.
    assert dose_at_volume_percent(dose, half, 98) == pytest.approx(0.8)
    assert volume_cc(half, 0.001) == pytest.approx(0.5 * N**3 * 0.001)
    # Weight 1 on the hottest half of the slabs, 0.25 on the cold half: the hot half holds 80 %.
    w = np.where(dose >= 20.0, 1.0, 0.25)
    assert volume_at_dose(dose, w, 20.0) == pytest.approx(80.0)
    with pytest.raises(InputError):
        dose_at_volume_percent(dose, np.full(dose.shape, 1.5), 50)


def test_paddick_ci_sphere_in_sphere() -> None:
    shape = (64, 64, 64)
    c = (31.5, 31.5, 31.5)
    target = sphere(shape, c, 10.0)
    rx = 8.0
    for r_iso in (12.0, 15.0):
        dose = np.where(sphere(shape, c, r_iso), rx, 0.3 * rx)
        # Target inside the isodose: TV_PIV = TV, CI = TV / PIV ~ (r_t / r_iso)^3.
        assert paddick_ci(dose, target, rx_gy=rx) == pytest.approx((10.0 / r_iso) ** 3, rel=0.05)
    # Isodose inside the target: TV_PIV = PIV, CI = PIV / TV.
    dose = np.where(sphere(shape, c, 7.0), rx, 0.0)
    assert paddick_ci(dose, target, rx_gy=rx) == pytest.approx((7.0 / 10.0) ** 3, rel=0.06)
    # Perfect conformity and no overlap.
    assert paddick_ci(np.where(target, rx, 0.0), target, rx_gy=rx) == pytest.approx(1.0)
    far = np.where(sphere(shape, (10, 10, 10), 4.0), rx, 0.0)
    assert paddick_ci(far, target, rx_gy=rx) == 0.0
    # The body mask bounds the isodose volume: hot voxels outside the body do not count.
    dose = np.where(sphere(shape, c, 15.0), rx, 0.0)
    assert paddick_ci(dose, target, rx_gy=rx, body_mask=target) == pytest.approx(1.0)
    assert evaluate_metric("CI", dose, target, 1.0, rx_gy=rx) == pytest.approx(paddick_ci(dose, target, rx_gy=rx))


def test_metric_grammar_matches_configuration() -> None:
    from appliance.config import Comparison, Goal
    from core.errors import ConfigError

    for metric in ("D98%", "D2cc", "V36Gy%", "V20.5Gycc", "Dmean", "Dmax", "HI", "CI", "D98", "V36%", "Dmin"):
        try:
            Goal("ptv", metric, Comparison.AT_MOST, 1.0)
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == bool(METRIC_RE.fullmatch(metric)), metric  # the configuration checks this grammar
    assert metric_unit("D98%") == "Gy" and metric_unit("D2cc") == "Gy" and metric_unit("Dmean") == "Gy"
    assert metric_unit("V36Gy%") == "%" and metric_unit("V20.5Gycc") == "cm3" and metric_unit("HI") == ""
    dose, mask = ramp_cube(40.0)
    assert evaluate_metric("Dmax", dose, mask, 1.0, rx_gy=40) == pytest.approx(dose.max())
    assert evaluate_metric("Dmean", dose, mask, 1.0, rx_gy=40) == pytest.approx(20.0)
    assert evaluate_metric("HI", dose, mask, 1.0, rx_gy=40) == pytest.approx(1.92)
    assert evaluate_metric("D50.5%", dose, mask, 1.0, rx_gy=40) == pytest.approx(40 * 0.495)
    assert evaluate_metric("V30Gy%", dose, mask, 1.0, rx_gy=40) == pytest.approx(25.0, abs=100 / N)
    for bad in ("D98", "V36%", "Dmin", "d98%", "D101%"):
        with pytest.raises(InputError):
            evaluate_metric(bad, dose, mask, 1.0, rx_gy=40)


def test_empty_and_mismatched_masks_are_refused() -> None:
    dose = np.ones((4, 4, 4))
    with pytest.raises(InputError, match="empty"):
        structure_metrics(dose, np.zeros(dose.shape, bool), 0.064, rx_gy=1.0)
    with pytest.raises(InputError, match="shape"):
        structure_metrics(dose, np.ones((4, 4, 3), bool), 0.064, rx_gy=1.0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 50.0),
    xs=st.lists(st.floats(0.0, 100.0), min_size=2, max_size=6),
)
def test_dx_is_monotone_bounded_and_linear_in_dose(seed: int, scale: float, xs: list[float]) -> None:
    rng = np.random.default_rng(seed)
    dose = rng.gamma(2.0, 2.0, size=(6, 7, 8))
    mask = rng.random(dose.shape) < 0.6
    mask[0, 0, 0] = True
    xs = sorted(xs)
    ds = [dose_at_volume_percent(dose, mask, x) for x in xs]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(ds))
    inside = dose[mask]
    assert all(inside.min() - 1e-12 <= d <= inside.max() + 1e-12 for d in ds)
    for x, d in zip(xs, ds):
        assert dose_at_volume_percent(scale * dose, mask, x) == pytest.approx(scale * d, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- goals


def test_goals_pass_fail_and_missing_structures() -> None:
    dose, _ = ramp_cube(40.0)
    ptv = np.zeros(dose.shape, bool)
    ptv[:, :, 45:] = True  # slabs 45..49: 36.4 .. 39.6 Gy
    rectum = np.zeros(dose.shape, bool)
    rectum[:, :, :10] = True  # 0.4 .. 7.6 Gy, mean 4 Gy
    empty = np.zeros(dose.shape, bool)
    goals = [
        GoalSpec("ptv", "D98%", ">=", 36.0, 1),
        GoalSpec("ptv", "D2%", "<=", 39.0, 1),
        GoalSpec("rectum", "Dmean", "<=", 5.0, 2),
        GoalSpec("rectum", "V7Gy%", "<=", 5.0, 1),
        GoalSpec("bladder", "Dmean", "<=", 14.0, 2),
        GoalSpec("femur_head_l", "Dmax", "<=", 30.0, 2),
    ]
    res = evaluate_goals_on_masks(goals, dose, {"ptv": ptv, "rectum": rectum, "femur_head_l": empty}, 0.064,
                                  rx_gy=38.0)
    assert [r["passed"] for r in res] == [True, False, True, False, None, None]
    assert res[0]["value"] == pytest.approx(dose_at_volume_percent(dose, ptv, 98))
    assert res[2]["value"] == pytest.approx(4.0) and res[2]["unit"] == "Gy"
    assert res[3]["unit"] == "%" and res[3]["value"] == pytest.approx(10.0)
    assert "no bladder" in res[4]["reason"] and res[4]["value"] is None
    assert "covers no voxel" in res[5]["reason"]
    assert set(res[0]) >= {"structure", "metric", "comparison", "limit", "value", "passed", "priority"}


def test_goal_spec_validation() -> None:
    with pytest.raises(InputError):
        GoalSpec("ptv", "D98%", "=>", 38.0)
    with pytest.raises(InputError):
        GoalSpec("ptv", "D98", ">=", 38.0)


def test_goals_from_the_configuration_convert() -> None:
    from appliance.config import Settings

    specs = list(Settings().profile().goal_specs())
    dose = np.full((8, 8, 8), 40.0)
    ptv = np.zeros(dose.shape, bool)
    ptv[2:6, 2:6, 2:6] = True
    res = evaluate_goals_on_masks(specs, dose, {"ptv": ptv}, 0.064, rx_gy=40.0)
    assert len(res) == len(specs)
    assert all(r["passed"] is None for r in res if r["structure"] != "ptv")
    assert all(r["passed"] is not None for r in res if r["structure"] == "ptv")


# --------------------------------------------------------------------------- normalisation


def test_normalisation_factor_is_exact() -> None:
    rng = np.random.default_rng(3)
    dose = rng.uniform(5.0, 9.0, size=(12, 12, 12))
    ptv = sphere(dose.shape, (5.5, 5.5, 5.5), 4.0)
    f = normalisation_factor(dose, ptv, rx_gy=8.0, mode="ptv_dx", volume_percent=95.0)
    assert dose_at_volume_percent(f * dose, ptv, 95.0) == pytest.approx(8.0, rel=1e-12)
    f = normalisation_factor(dose, ptv, rx_gy=8.0, mode="ptv_dx", volume_percent=50.0)
    assert dose_at_volume_percent(f * dose, ptv, 50.0) == pytest.approx(8.0, rel=1e-12)
    f = normalisation_factor(dose, ptv, rx_gy=8.0, mode="ptv_mean")
    assert float((f * dose)[ptv].mean()) == pytest.approx(8.0, rel=1e-12)
    assert normalisation_factor(dose, ptv, rx_gy=8.0, mode="none") == 1.0


def test_normalisation_refuses_bad_input() -> None:
    dose = np.zeros((5, 5, 5))
    ptv = np.ones(dose.shape, bool)
    with pytest.raises(PlanningError, match="no dose in the PTV"):
        normalisation_factor(dose, ptv, rx_gy=8.0)
    with pytest.raises(InputError):
        normalisation_factor(dose + 1, ptv, rx_gy=8.0, mode="max")
    with pytest.raises(InputError):
        normalisation_factor(dose + 1, ptv, rx_gy=8.0, volume_percent=100.0)


# ------------------------------------------------------------------------------------------------
# The fast paths of the evaluation give the values of the plain computations


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_dose_at_ct_voxels_equals_scipy_trilinear_with_zero_outside(seed: int) -> None:
    from scipy.ndimage import map_coordinates

    from core.case import Grid
    from pipeline.evaluation import dose_at_ct_voxels

    rng = np.random.default_rng(seed)
    dose_grid = Grid(origin_mm=tuple(rng.uniform(-20, 0, 3)), spacing_mm=tuple(rng.uniform(2.0, 5.0, 3)),
                     shape=tuple(int(n) for n in rng.integers(2, 9, 3)))  # type: ignore[arg-type]
    ct_grid = Grid(origin_mm=tuple(rng.uniform(-30, 0, 3)), spacing_mm=tuple(rng.uniform(0.7, 3.0, 3)),
                   shape=tuple(int(n) for n in rng.integers(5, 30, 3)))  # type: ignore[arg-type]
    dose = rng.uniform(0, 50, dose_grid.shape).astype(np.float32)
    box = tuple(slice(int(a), int(b)) for a, b in (sorted(rng.integers(0, n + 1, 2)) for n in ct_grid.shape))
    if any(b.stop <= b.start for b in box):
        return
    got = dose_at_ct_voxels(dose, dose_grid, ct_grid, box)  # type: ignore[arg-type]
    cx, cy, cz = ct_grid.axes_mm()
    f = [(c[b] - dose_grid.origin_mm[a]) / dose_grid.spacing_mm[a] for c, b, a in ((cz, box[0], 2),
                                                                                   (cy, box[1], 1), (cx, box[2], 0))]
    expected = map_coordinates(dose, np.meshgrid(*f, indexing="ij"), order=1, mode="constant", cval=0.0)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_whole_voxel_dvh_equals_the_weighted_dvh(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dose = np.round(rng.uniform(0, 45, (6, 7, 8)), int(rng.integers(0, 3))).astype(np.float32)  # ties included
    mask = rng.random(dose.shape) < 0.4
    if not mask.any():
        return
    weighted = mask.astype(np.float64)  # the general (fractional) path with whole-voxel weights
    for percent in (2.0, 50.0, 98.0):
        assert dose_at_volume_percent(dose, mask, percent) == dose_at_volume_percent(dose, weighted, percent)
    assert volume_at_dose(dose, mask, 20.0) == volume_at_dose(dose, weighted, 20.0)
    fast, plain = structure_metrics(dose, mask, 0.1, rx_gy=40.0), structure_metrics(dose, weighted, 0.1, rx_gy=40.0)
    assert fast.keys() == plain.keys()
    for key, value in fast.items():
        assert value == pytest.approx(plain[key], rel=1e-12, abs=1e-12), key


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["uniform", "ties", "constant", "mostly_zero", "float64"]))
def test_large_selections_answer_as_the_full_sort(seed: int, kind: str) -> None:
    """A selection above BUCKETED_ABOVE is not sorted whole; every answer must still be the sorted one's, bit for
    bit (Dx at any fraction, ties and clamped ends included), Vx exactly and Dmean to rounding."""
    from unittest import mock

    import pipeline.dvh as dvh

    rng = np.random.default_rng(seed)
    shape = (7, 9, 11)
    if kind == "uniform":
        dose = rng.uniform(0, 45, shape).astype(np.float32)
    elif kind == "ties":
        dose = np.round(rng.uniform(0, 10, shape), 1).astype(np.float32)
    elif kind == "constant":
        dose = np.full(shape, 3.5, dtype=np.float32)
    elif kind == "mostly_zero":
        dose = np.where(rng.random(shape) < 0.8, 0.0, rng.uniform(0, 1e-3, shape)).astype(np.float32)
        dose.flat[0] = 50.0
    else:
        dose = rng.normal(20, 5, shape)
    mask = rng.random(shape) < 0.6
    mask.flat[0] = True
    fractions = [0.0, 1e-9, 0.02, 0.5, 0.95, 0.98, 1.0, *rng.random(4)]
    with mock.patch.object(dvh, "BUCKETED_ABOVE", 0):
        big = dvh._selection(dose, mask, fractions[:3])
        assert isinstance(big, dvh._Bucketed)
        fast = structure_metrics(dose, mask, 0.1, rx_gy=40.0)
        fast_metric = evaluate_metric("D95%", dose, mask, 0.1, rx_gy=40.0)
    full = dvh._Sorted(dose, mask)
    with mock.patch.object(dvh, "BUCKETED_ABOVE", 0):  # no finite range to bucket: sorted whole, as before
        with_nan = np.where(np.arange(dose.size).reshape(shape) == 0, np.nan, dose)  # voxel 0 is in the mask
        assert isinstance(dvh._selection(with_nan, mask), dvh._Sorted)
    assert [big.d_at_fraction(f) for f in fractions] == [full.d_at_fraction(f) for f in fractions]
    for level in (0.0, 3.5, float(np.median(dose)), 40.0):
        assert big.v_at_dose(level) == full.v_at_dose(level)
    assert (big.dmin, big.dmax, big.total) == (full.dmin, full.dmax, full.total)
    assert big.mean() == pytest.approx(full.mean(), rel=1e-12, abs=1e-12)
    plain = structure_metrics(dose, mask, 0.1, rx_gy=40.0)
    for key, value in fast.items():
        assert value == pytest.approx(plain[key], rel=1e-12, abs=1e-12), key
    assert fast_metric == evaluate_metric("D95%", dose, mask, 0.1, rx_gy=40.0)
