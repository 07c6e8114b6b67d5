"""Leaf sequencer, fluence from a sequence and deliverability checks.

The Numba kernels are compared with a plain NumPy reference written here (a second,
independent implementation of the rules in ``sequencing.sequencer``'s docstring).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from core.errors import SequencingError
from core.machine import ArcSpec, MachineModel, RotationDirection
from sequencing import _kernels
from sequencing.deliverability import check_deliverable, delivery_time_s, segment_times_s
from sequencing.fluence import fluence_from_sequence, synthetic_arc_fluence
from sequencing.sequencer import ArcSequence, allowed_leaf_travel_mm, sequence_arc

ARC = ArcSpec()
MACHINE = MachineModel()
W = MACHINE.bev.pixel_mm
X0 = -MACHINE.bev.half_width_mm
Y0 = -MACHINE.bev.half_height_mm
FIRST = MACHINE.first_bev_leaf_pair
N, R, C = ARC.n_sectors, MACHINE.bev.n_rows, MACHINE.bev.n_cols


# ----------------------------------------------------------------------------- NumPy reference


def ref_sector_apertures(
    F: NDArray[np.float64], threshold: float
) -> tuple[NDArray[np.bool_], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Plain NumPy version of ``_kernels.sector_apertures``."""
    n = F.shape[0]
    is_open = np.zeros((n, R), bool)
    lo = np.zeros((n, R))
    hi = np.zeros((n, R))
    level = np.zeros(n)
    for k in range(n):
        m = F[k].max()
        if m <= 0:
            continue
        runs: list[tuple[int, int] | None] = []
        for r in range(R):
            mask = np.concatenate([[0], (F[k, r] >= threshold * m).astype(int), [0]])
            starts = np.flatnonzero(np.diff(mask) == 1)
            stops = np.flatnonzero(np.diff(mask) == -1)  # exclusive
            if starts.size == 0:
                runs.append(None)
                continue
            sums = [F[k, r, a:b].sum() for a, b in zip(starts, stops)]
            i = int(np.argmax(sums))  # first maximum, as the kernel (strictly greater wins)
            runs.append((int(starts[i]), int(stops[i]) - 1))
        interior = [F[k, r, c0 + 1 : c1] for r, rc in enumerate(runs) if rc is not None for c0, c1 in [rc]]
        inner = np.concatenate(interior) if interior else np.zeros(0)
        if inner.size:
            L = inner.mean()
        else:
            L = max(F[k, r, c0 : c1 + 1].max() for r, rc in enumerate(runs) if rc is not None for c0, c1 in [rc])
        level[k] = L
        for r, rc in enumerate(runs):
            if rc is None:
                continue
            c0, c1 = rc
            is_open[k, r] = True
            row = np.concatenate([[0.0], F[k, r], [0.0]])  # row[c + 1] is pixel c
            fr = np.clip(row / L, 0.0, 1.0)
            edges = X0 + W * np.arange(C + 1)
            if c0 == c1 and fr[c0 + 1] < 1:
                ctr = 0.5 * (edges[c0] + edges[c0 + 1])
                lo[k, r], hi[k, r] = ctr - 0.5 * W * fr[c0 + 1], ctr + 0.5 * W * fr[c0 + 1]
                continue
            lo[k, r] = edges[c0 + 1] - W * fr[c0 + 1] if fr[c0 + 1] < 1 else edges[c0] - W * fr[c0]
            hi[k, r] = edges[c1] + W * fr[c1 + 1] if fr[c1 + 1] < 1 else edges[c1 + 1] + W * fr[c1 + 2]
        rows_open = np.flatnonzero(is_open[k])
        for rc_ in np.flatnonzero(~is_open[k]):
            d = np.abs(rows_open - rc_)
            near = rows_open[d == d.min()]
            ctr = (0.5 * (lo[k, near] + hi[k, near])).mean()
            lo[k, rc_] = hi[k, rc_] = ctr
    return is_open, lo, hi, level


def ref_sequence(F: NDArray[np.float64], machine: MachineModel, threshold: float = 0.15) -> ArcSequence:
    """Plain NumPy version of the whole of ``sequence_arc`` (travel limiting included)."""
    dlg, gap, lim = machine.dosimetric_leaf_gap_mm, machine.min_leaf_gap_mm, machine.max_jaw_mm
    is_open, lo, hi, level = ref_sector_apertures(F.astype(np.float64), threshold)
    full = np.flatnonzero(level > 0)
    for k in np.flatnonzero(level <= 0):
        d = np.abs(full - k)
        src = full[np.flatnonzero(d == d.min())[0]]  # earlier sector wins a tie
        lo[k] = hi[k] = 0.5 * (lo[src] + hi[src])
    n = F.shape[0]
    el = np.empty((n + 1, R))
    eh = np.empty((n + 1, R))
    el[0], eh[0], el[n], eh[n] = lo[0], hi[0], lo[n - 1], hi[n - 1]
    for j in range(1, n):
        p, q = j - 1, j
        both = is_open[p] & is_open[q]
        one = is_open[p] ^ is_open[q]
        o = np.where(is_open[p], p, q)
        cols = np.arange(R)
        mid_o = 0.5 * (lo[o, cols] + hi[o, cols])
        none_mid = 0.25 * (lo[p] + hi[p] + lo[q] + hi[q])
        el[j] = np.where(both, 0.5 * (lo[p] + lo[q]), np.where(one, 0.5 * (lo[o, cols] + mid_o), none_mid))
        eh[j] = np.where(both, 0.5 * (hi[p] + hi[q]), np.where(one, 0.5 * (hi[o, cols] + mid_o), none_mid))
    a = el + dlg / 2
    b = eh - dlg / 2
    narrow = b - a < gap
    ctr = 0.5 * (a + b)
    a = np.where(narrow, ctr - gap / 2, a)
    b = np.where(narrow, ctr + gap / 2, b)
    a, b = np.maximum(a, -lim), np.minimum(b, lim)
    leaves = np.empty((n + 1, machine.n_leaf_pairs, 2))
    leaves[..., 0], leaves[..., 1] = -gap / 2, gap / 2
    leaves[:, FIRST : FIRST + R, 0], leaves[:, FIRST : FIRST + R, 1] = a, b

    delta = ARC.span_deg() / ARC.n_sectors
    mu = np.clip(level, machine.min_mu_per_deg * delta, machine.max_mu_per_deg * delta)
    D = allowed_leaf_travel_mm(mu, delta, machine) * (1 - 1e-9)
    leaves = ref_limit_travel(leaves, D, gap)

    jaws = np.zeros((n + 1, 4))
    gaps = leaves[:, FIRST : FIRST + R, 1] - leaves[:, FIRST : FIRST + R, 0]
    op = gaps > gap + 1e-3
    with_open = np.flatnonzero(op.any(axis=1))
    for j in range(n + 1):
        src = with_open[np.argmin(np.abs(with_open - j))]  # a closed control point borrows the nearest jaws
        rows = np.flatnonzero(op[src])
        aa = leaves[src, FIRST + rows, 0] - dlg / 2
        bb = leaves[src, FIRST + rows, 1] + dlg / 2
        jaws[j] = [
            max(aa.min() - machine.jaw_margin_mm, -lim),
            min(bb.max() + machine.jaw_margin_mm, lim),
            Y0 + W * rows.min(),
            Y0 + W * (rows.max() + 1),
        ]
    cum = np.concatenate([[0.0], np.cumsum(mu)])
    return ArcSequence(ARC.control_point_angles_deg(), leaves, jaws, cum, ARC.collimator_deg, ARC.direction)


def ref_limit_travel(leaves: NDArray[np.float64], D: NDArray[np.float64], gap: float) -> NDArray[np.float64]:
    """NumPy version of ``_kernels.limit_leaf_travel`` (vectorised over leaf pairs)."""

    def step(prev: NDArray[np.float64], tgt: NDArray[np.float64], d: float) -> NDArray[np.float64]:
        a = np.clip(tgt[:, 0], prev[:, 0] - d, prev[:, 0] + d)
        b = np.clip(tgt[:, 1], prev[:, 1] - d, prev[:, 1] + d)
        half = np.where(b - a < gap, 0.5 * (gap - (b - a)), 0.0)
        a, b = a - half, b + half
        under = np.maximum(prev[:, 0] - d - a, 0.0)
        a, b = a + under, b + under
        over = np.maximum(b - (prev[:, 1] + d), 0.0)
        return np.stack([a - over, b - over], axis=1)

    n1 = leaves.shape[0]
    need = (np.abs(np.diff(leaves, axis=0)) > D[:, None, None]).any(axis=(0, 2))
    fwd = leaves.copy()
    bwd = leaves.copy()
    for k in range(n1 - 1):
        fwd[k + 1] = step(fwd[k], leaves[k + 1], D[k])
    for k in range(n1 - 2, -1, -1):
        bwd[k] = step(bwd[k + 1], leaves[k], D[k])
    out = leaves.copy()
    out[:, need] = 0.5 * (fwd[:, need] + bwd[:, need])
    return out


def ref_fluence(seq: ArcSequence, machine: MachineModel, substeps: int) -> NDArray[np.float64]:
    """Vectorised NumPy version of ``fluence_from_sequence``."""
    dlg = machine.dosimetric_leaf_gap_mm
    xe = X0 + W * np.arange(C + 1)
    ye = Y0 + W * np.arange(R + 1)
    L = seq.leaves_mm[:, FIRST : FIRST + R]
    J = seq.jaws_mm
    out = np.zeros((seq.n_control_points - 1, R, C))
    for s in range(substeps):
        t = (s + 0.5) / substeps
        Lt = (1 - t) * L[:-1] + t * L[1:]
        Jt = (1 - t) * J[:-1] + t * J[1:]
        a = np.maximum(Lt[..., 0] - dlg / 2, Jt[:, 0:1])[..., None]
        b = np.minimum(Lt[..., 1] + dlg / 2, Jt[:, 1:2])[..., None]
        ox = np.clip(np.minimum(b, xe[1:]) - np.maximum(a, xe[:-1]), 0, None)
        oy = np.clip(np.minimum(Jt[:, 3:4], ye[1:]) - np.maximum(Jt[:, 2:3], ye[:-1]), 0, None)
        out += ox * oy[..., None] / (W * W)
    return out * (seq.segment_mu() / substeps)[:, None, None]


# ----------------------------------------------------------------------------- helpers


def rel_l1(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def aperture_map(lo_mm: NDArray[np.float64], hi_mm: NDArray[np.float64], level: float) -> NDArray[np.float64]:
    """One 40 x 40 map delivering ``level`` MU through effective row apertures ``[lo, hi]`` (NaN = closed)."""
    xe = X0 + W * np.arange(C + 1)
    ox = np.clip(np.minimum(hi_mm[:, None], xe[1:]) - np.maximum(lo_mm[:, None], xe[:-1]), 0, None)
    return np.nan_to_num(level * ox / W)


@pytest.fixture(scope="module")
def realistic() -> NDArray[np.float64]:
    return synthetic_arc_fluence(ARC, MACHINE, seed=3)


# ----------------------------------------------------------------------------- interface and errors


def test_shapes_and_types(realistic: NDArray[np.float64]) -> None:
    seq = sequence_arc(realistic.astype(np.float32), ARC, MACHINE)
    assert seq.gantry_deg.shape == (N + 1,)
    assert seq.leaves_mm.shape == (N + 1, MACHINE.n_leaf_pairs, 2)
    assert seq.jaws_mm.shape == (N + 1, 4)
    assert seq.cumulative_mu.shape == (N + 1,)
    assert seq.segment_mu().shape == (N,)
    assert seq.cumulative_mu[0] == 0 and np.all(np.diff(seq.cumulative_mu) >= 0)
    assert seq.total_mu == pytest.approx(seq.segment_mu().sum())
    np.testing.assert_allclose(seq.gantry_deg, ARC.control_point_angles_deg())
    assert seq.direction is RotationDirection.CW and seq.collimator_deg == ARC.collimator_deg
    assert not seq.leaves_mm.flags.writeable
    assert fluence_from_sequence(seq, MACHINE).shape == (N, R, C)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda F: F[:-1], "must be (180, 40, 40)"),
        (lambda F: F.astype(np.int64), "float32 or float64"),
        (lambda F: np.where(np.arange(C) == 3, np.nan, F), "NaN"),
        (lambda F: np.where(np.arange(C) == 3, np.inf, F), "NaN/inf"),
        (lambda F: F - 0.5, "negative"),
        (lambda F: F * 0, "nothing to deliver"),
        (lambda F: list(F), "numpy array"),
    ],
)
def test_bad_fluence_is_refused(realistic: NDArray[np.float64], make, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SequencingError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        sequence_arc(make(realistic), ARC, MACHINE)


def test_bad_threshold_and_machine_are_refused(realistic: NDArray[np.float64]) -> None:
    with pytest.raises(SequencingError, match="threshold"):
        sequence_arc(realistic, ARC, MACHINE, threshold=1.0)
    with pytest.raises(SequencingError, match="min_mu_per_deg"):
        sequence_arc(realistic, ARC, dataclasses.replace(MACHINE, min_mu_per_deg=30.0), threshold=0.2)
    # 40 pairs of 5 mm starting at y = -95 mm: the BEV rows (from -100 mm) are not centred on them
    shifted = dataclasses.replace(
        MACHINE, leaf_boundaries_mm=tuple(np.arange(-95.0, 110.0, 5.0)), first_bev_leaf_pair=0
    )
    with pytest.raises(SequencingError, match="first_bev_leaf_pair"):
        sequence_arc(realistic, ARC, shifted)
    with pytest.raises(SequencingError, match="substeps"):
        fluence_from_sequence(sequence_arc(realistic, ARC, MACHINE), MACHINE, substeps=0)


def test_arc_sequence_validates_shapes() -> None:
    with pytest.raises(SequencingError, match="jaws_mm"):
        ArcSequence(np.zeros(3), np.zeros((3, 60, 2)), np.zeros((2, 4)), np.zeros(3), 0.0, RotationDirection.CW)
    with pytest.raises(SequencingError, match="leaves_mm"):
        ArcSequence(np.zeros(3), np.zeros((3, 60)), np.zeros((3, 4)), np.zeros(3), 0.0, RotationDirection.CW)


# ----------------------------------------------------------------------------- apertures


def test_rectangle_gives_that_aperture_and_mu() -> None:
    F = np.zeros((N, R, C))
    F[:, 10:20, 12:26] = 7.0
    seq = sequence_arc(F, ARC, MACHINE)
    dlg, gap = MACHINE.dosimetric_leaf_gap_mm, MACHINE.min_leaf_gap_mm
    lo, hi = X0 + 12 * W, X0 + 26 * W
    pairs = seq.leaves_mm[:, FIRST + 10 : FIRST + 20]
    np.testing.assert_allclose(pairs[..., 0], lo + dlg / 2, atol=1e-12)
    np.testing.assert_allclose(pairs[..., 1], hi - dlg / 2, atol=1e-12)
    np.testing.assert_allclose(seq.segment_mu(), 7.0)
    closed = np.r_[0 : FIRST + 10, FIRST + 20 : MACHINE.n_leaf_pairs]
    np.testing.assert_allclose(np.diff(seq.leaves_mm[:, closed], axis=-1), gap, atol=1e-12)
    np.testing.assert_allclose(
        seq.jaws_mm,
        np.broadcast_to([lo - MACHINE.jaw_margin_mm, hi + MACHINE.jaw_margin_mm, Y0 + 10 * W, Y0 + 20 * W], (N + 1, 4)),
    )
    np.testing.assert_allclose(fluence_from_sequence(seq, MACHINE), F, atol=1e-12)
    assert check_deliverable(seq, MACHINE) == []


@pytest.mark.parametrize(("frac", "inside"), [(0.5, True), (0.3, True), (0.1, False), (0.05, False)])
def test_subpixel_edges_are_recovered(frac: float, inside: bool) -> None:
    """An edge pixel at ``frac`` of the level puts the leaf ``frac`` of a pixel into it.

    With the default threshold 0.15, fractions >= 0.15 are part of the run (edge pixel inside),
    smaller ones lie just outside the run (the outward pixel refinement).
    """
    level = 4.0
    F = np.zeros((N, R, C))
    F[:, 5, 10:20] = level
    F[:, 5, 9] = frac * level  # left neighbour partially open
    F[:, 5, 20] = (1 - frac) * level  # right neighbour partially open
    seq = sequence_arc(F, ARC, MACHINE)
    dlg = MACHINE.dosimetric_leaf_gap_mm
    a, b = seq.leaves_mm[0, FIRST + 5]
    assert a - dlg / 2 == pytest.approx(X0 + 10 * W - frac * W, abs=1e-9)
    assert b + dlg / 2 == pytest.approx(X0 + 20 * W + (1 - frac) * W, abs=1e-9)
    assert (frac >= 0.15) is inside
    np.testing.assert_allclose(fluence_from_sequence(seq, MACHINE), F, atol=1e-9)


def test_single_pixel_partial_aperture_is_centred() -> None:
    F = np.zeros((N, R, C))
    F[:, 7, 3:10] = 5.0  # sets the level (interior pixels)
    F[:, 20, 15] = 2.5  # a half-open lone pixel
    seq = sequence_arc(F, ARC, MACHINE)
    a, b = seq.leaves_mm[0, FIRST + 20]
    dlg = MACHINE.dosimetric_leaf_gap_mm
    ctr = X0 + 15.5 * W
    assert (a - dlg / 2, b + dlg / 2) == (pytest.approx(ctr - W / 4), pytest.approx(ctr + W / 4))


@pytest.mark.parametrize("dlg", [0.0, 1.3, 3.0])
def test_dlg_convention_round_trips(dlg: float) -> None:
    """Leaves sit DLG/2 inside the effective aperture; fluence_from_sequence widens them back."""
    rng = np.random.default_rng(11)
    lo = X0 + rng.uniform(20, 60, R)
    hi = lo + rng.uniform(8, 90, R)
    F = np.broadcast_to(aperture_map(lo, hi, 6.0), (N, R, C)).copy()
    m = dataclasses.replace(MACHINE, dosimetric_leaf_gap_mm=dlg)
    seq = sequence_arc(F, ARC, m)
    np.testing.assert_allclose(seq.leaves_mm[:, FIRST : FIRST + R, 0], np.broadcast_to(lo + dlg / 2, (N + 1, R)))
    np.testing.assert_allclose(seq.leaves_mm[:, FIRST : FIRST + R, 1], np.broadcast_to(hi - dlg / 2, (N + 1, R)))
    np.testing.assert_allclose(fluence_from_sequence(seq, m), F, atol=1e-9)


def test_dicom_leaf_order_and_banks() -> None:
    """Index 0 is the negative-x (X1, leaves 1xx) bank; pair index follows LeafPositionBoundaries."""
    F = np.zeros((N, R, C))
    F[:, 0, 2:8] = 3.0  # BEV row 0 (most negative y), on the negative-x side
    seq = sequence_arc(F, ARC, MACHINE)
    open_pairs = np.flatnonzero(np.diff(seq.leaves_mm[0], axis=-1)[:, 0] > MACHINE.min_leaf_gap_mm + 1e-6)
    assert open_pairs.tolist() == [FIRST]
    assert MACHINE.leaf_boundaries_mm[FIRST] == pytest.approx(Y0)
    a, b = seq.leaves_mm[0, FIRST]
    assert a < b < 0 and a == pytest.approx(X0 + 2 * W + MACHINE.dosimetric_leaf_gap_mm / 2)
    assert np.all(seq.leaves_mm[..., 0] <= seq.leaves_mm[..., 1])
    x1, x2, y1, y2 = seq.jaws_mm[0]
    assert x1 < a and x2 > b and (y1, y2) == (pytest.approx(Y0), pytest.approx(Y0 + W))


# ----------------------------------------------------------------------------- fidelity


def test_fluence_from_sequence_integrates_a_moving_leaf() -> None:
    """A leaf edge sweeping one pixel at constant speed opens it by half on average."""
    leaves = np.zeros((2, MACHINE.n_leaf_pairs, 2))
    leaves[..., 0], leaves[..., 1] = -0.25, 0.25
    dlg = MACHINE.dosimetric_leaf_gap_mm
    leaves[:, FIRST + 3, 0] = X0 + 10 * W + dlg / 2
    leaves[0, FIRST + 3, 1] = X0 + 20 * W - dlg / 2
    leaves[1, FIRST + 3, 1] = X0 + 21 * W - dlg / 2
    jaws = np.array([[-100.0, 100.0, -100.0, 100.0]] * 2)
    seq = ArcSequence(np.array([0.0, 2.0]), leaves, jaws, np.array([0.0, 8.0]), 0.0, RotationDirection.CW)
    for substeps in (1, 2, 8):
        out = fluence_from_sequence(seq, MACHINE, substeps=substeps)
        assert out[0, 3, 20] == pytest.approx(4.0)
        np.testing.assert_allclose(out[0, 3, 10:20], 8.0)
    # closed pairs inside the jaws leak a strip min_gap + DLG wide
    assert out[0, 5].sum() == pytest.approx(8.0 * (0.5 + dlg) / W)


def test_constant_two_level_arc_is_reproduced_exactly() -> None:
    rng = np.random.default_rng(5)
    lo = X0 + rng.uniform(30, 70, R)
    hi = lo + rng.uniform(10, 60, R)
    lo[:8] = hi[:8] = np.nan  # closed rows at the bottom
    lo[33:] = hi[33:] = np.nan  # and at the top
    F = np.broadcast_to(aperture_map(lo, hi, 9.0), (N, R, C)).copy()
    seq = sequence_arc(F, ARC, MACHINE)
    np.testing.assert_allclose(fluence_from_sequence(seq, MACHINE), F, atol=1e-9)


def test_moving_two_level_aperture_fidelity() -> None:
    """A slowly moving, changing aperture is reproduced within 2 % (relative L1)."""
    k = np.arange(N)[:, None]
    lo = X0 + 60 + 20 * np.sin(k / 30.0) + np.linspace(0, 10, R)
    hi = lo + 40 + 15 * np.cos(k / 25.0)
    F = np.stack([aperture_map(lo[i], hi[i], 8.0 + 2 * np.sin(i / 20)) for i in range(N)])
    F[:, :6] = F[:, 36:] = 0.0
    seq = sequence_arc(F, ARC, MACHINE)
    R_ = fluence_from_sequence(seq, MACHINE)
    err = rel_l1(R_, F)
    assert err < 0.02, err
    assert check_deliverable(seq, MACHINE) == []


def test_realistic_maps_fidelity_and_deliverable(realistic: NDArray[np.float64]) -> None:
    """Projected-ellipsoid maps (curved edges, notch, level modulation): relative L1 error < 8 %.

    The error comes from rows partially covered in y (a leaf pair cannot open part of its
    width) and from apertures changing between sectors; total delivered MU x area stays within 2 %.
    """
    seq = sequence_arc(realistic, ARC, MACHINE)
    R_ = fluence_from_sequence(seq, MACHINE)
    assert rel_l1(R_, realistic) < 0.08
    assert abs(R_.sum() / realistic.sum() - 1) < 0.02
    assert check_deliverable(seq, MACHINE) == []
    assert delivery_time_s(seq, MACHINE) >= seq.total_mu * 60 / MACHINE.max_dose_rate_mu_min


# ----------------------------------------------------------------------------- deliverability


def test_random_maps_are_deliverable_after_travel_limiting() -> None:
    rng = np.random.default_rng(2)
    F = rng.uniform(0, 1, (N, R, C)) * rng.uniform(0.5, 3, (N, 1, 1))
    relaxed = sequence_arc(F, ARC, MACHINE, allow_gantry_slowdown=True)
    problems = check_deliverable(relaxed, MACHINE)
    assert len(problems) == 1 and problems[0].startswith("leaf speed above 25.0 mm/s")
    assert check_deliverable(relaxed, MACHINE, allow_gantry_slowdown=True) == []
    seq = sequence_arc(F, ARC, MACHINE)
    assert check_deliverable(seq, MACHINE) == []
    assert delivery_time_s(seq, MACHINE) < delivery_time_s(relaxed, MACHINE)
    np.testing.assert_allclose(seq.segment_mu(), relaxed.segment_mu())


def test_mu_headroom_keeps_leaves_within_speed_after_scaling_down() -> None:
    """Normalising a plan to fewer MU shortens MU-limited segments; the headroom covers that."""
    rng = np.random.default_rng(2)
    F = rng.uniform(0, 1, (N, R, C)) * rng.uniform(8, 12, (N, 1, 1))  # MU-limited segments

    def scaled(seq: ArcSequence, f: float) -> ArcSequence:
        return dataclasses.replace(seq, cumulative_mu=seq.cumulative_mu * f)

    plain = sequence_arc(F, ARC, MACHINE)
    assert check_deliverable(plain, MACHINE) == []
    assert any(p.startswith("leaf speed above") for p in check_deliverable(scaled(plain, 0.9), MACHINE))
    roomy = sequence_arc(F, ARC, MACHINE, mu_headroom=0.1)
    assert check_deliverable(scaled(roomy, 0.9), MACHINE) == []
    np.testing.assert_allclose(roomy.segment_mu(), plain.segment_mu())  # only the leaf travel differs
    with pytest.raises(SequencingError, match="mu_headroom"):
        sequence_arc(F, ARC, MACHINE, mu_headroom=0.5)


def test_jumping_aperture_is_limited_to_leaf_speed() -> None:
    """An aperture that jumps 80 mm every 10 sectors cannot be followed at full gantry speed."""
    F = np.zeros((N, R, C))
    for k in range(N):
        start = 2 if (k // 10) % 2 == 0 else 22
        F[k, 10:30, start : start + 14] = 2.0
    seq = sequence_arc(F, ARC, MACHINE)
    assert check_deliverable(seq, MACHINE) == []
    t = segment_times_s(seq, MACHINE, include_leaves=False)
    travel = np.abs(np.diff(seq.leaves_mm, axis=0)).max(axis=(1, 2))
    assert np.all(travel <= MACHINE.max_leaf_speed_mm_s * t + 1e-9)
    assert travel.max() == pytest.approx(MACHINE.max_leaf_speed_mm_s * t.max(), rel=1e-6)


def test_mu_per_degree_is_capped() -> None:
    F = np.zeros((N, R, C))
    F[:, 15:25, 15:25] = 100.0  # 100 MU in a 1.99 degree sector: above 20 MU/deg
    seq = sequence_arc(F, ARC, MACHINE)
    delta = ARC.span_deg() / N
    np.testing.assert_allclose(seq.segment_mu(), MACHINE.max_mu_per_deg * delta)
    assert check_deliverable(seq, MACHINE) == []


def test_check_deliverable_reports_each_violation(realistic: NDArray[np.float64]) -> None:
    seq = sequence_arc(realistic, ARC, MACHINE)
    leaves = seq.leaves_mm.copy()
    leaves[40, FIRST + 5, 1] = leaves[40, FIRST + 5, 0] + 0.1  # gap 0.1 mm
    leaves[90, FIRST + 20, 0] -= 40.0  # a 40 mm jump and back
    leaves[3, 0, 0] = -250.0  # beyond the jaws' range
    cum = seq.cumulative_mu.copy()
    cum[100:] -= 3 * seq.segment_mu()[99]  # MU goes down at cp 100
    cum[150:] += 100.0  # 100 MU in one sector
    jaws = seq.jaws_mm.copy()
    jaws[7, [2, 3]] = jaws[7, [3, 2]]
    bad = ArcSequence(seq.gantry_deg, leaves, jaws, cum, seq.collimator_deg, seq.direction)
    text = "\n".join(check_deliverable(bad, MACHINE))
    for needle in (
        "leaf gap below the minimum 0.5 mm at 1 pair positions; worst: control point 40, pair 16",
        "leaf speed above 25.0 mm/s",
        "leaf 101 moves 249.75 mm",  # the parked leaf (-0.25 mm) sent to -250 mm
        "leaves outside +-200.0 mm",
        "cumulative MU decreases in 1 segments; worst: control point 99 -> 100",
        "MU per degree above the machine maximum 20.0 in 1 segments; worst: segment 149",
        "Y1 jaw beyond Y2 at 1 control points; first: control point 7",
    ):
        assert needle in text, (needle, text)
    wrong_way = ArcSequence(
        seq.gantry_deg[::-1], seq.leaves_mm, seq.jaws_mm, seq.cumulative_mu, 30.0, RotationDirection.CW
    )
    assert any("do not advance CW" in m for m in check_deliverable(wrong_way, MACHINE))
    other = dataclasses.replace(MACHINE, leaf_boundaries_mm=tuple(np.arange(-100.0, 105.0, 5.0)), first_bev_leaf_pair=0)
    assert "needs (181, 40, 2)" in check_deliverable(seq, other)[0]


def test_counter_clockwise_arc() -> None:
    arc = ArcSpec(start_deg=179.0, stop_deg=181.0, direction=RotationDirection.CC, n_sectors=90)
    F = synthetic_arc_fluence(arc, MACHINE, seed=1)
    seq = sequence_arc(F, arc, MACHINE)
    assert seq.direction is RotationDirection.CC and seq.n_control_points == 91
    assert check_deliverable(seq, MACHINE) == []


# ----------------------------------------------------------------------------- NumPy reference


def _structured_map(case: int) -> NDArray[np.float64]:
    rng = np.random.default_rng(9)
    if case == 3:
        return synthetic_arc_fluence(ARC, MACHINE, seed=8)
    if case == 2:
        return rng.uniform(0, 1, (N, R, C)) ** 3
    holes = synthetic_arc_fluence(ARC, MACHINE, seed=4, noise=0.1)
    holes[:, 20] = 0.0  # a closed row between open ones
    holes[50:53] = 0.0  # empty sectors
    runs = np.zeros((N, R, C))
    runs[:, :, 3:8] = 2.0
    runs[:, :, 12:30] = 1.0  # two runs: the one with more fluence wins
    runs[:, 30:, 12:30] = 0.2
    return holes if case == 0 else runs


@pytest.mark.parametrize("case", range(4))
def test_kernels_match_numpy_reference(case: int) -> None:
    F = _structured_map(case)
    got = _kernels.sector_apertures(F, 0.15, W, X0)
    want = ref_sector_apertures(F, 0.15)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64), atol=1e-12)
    seq = sequence_arc(F, ARC, MACHINE)
    ref = ref_sequence(F, MACHINE)
    np.testing.assert_allclose(seq.leaves_mm, ref.leaves_mm, atol=1e-9)
    np.testing.assert_allclose(seq.jaws_mm, ref.jaws_mm, atol=1e-9)
    np.testing.assert_allclose(seq.cumulative_mu, ref.cumulative_mu, rtol=1e-12)
    for substeps in (1, 5):
        np.testing.assert_allclose(
            fluence_from_sequence(seq, MACHINE, substeps=substeps), ref_fluence(seq, MACHINE, substeps), atol=1e-9
        )
    assert check_deliverable(seq, MACHINE) == []


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.floats(0.05, 0.5), sparsity=st.floats(0.0, 0.9))
def test_random_maps_property(seed: int, threshold: float, sparsity: float) -> None:
    """Any non-negative map: kernels equal the reference and the result is deliverable."""
    rng = np.random.default_rng(seed)
    F = rng.uniform(0, 1, (N, R, C)) * (rng.uniform(0, 1, (N, R, C)) > sparsity) * rng.uniform(0, 30, (N, 1, 1))
    F[0, 0, 0] += 1.0
    seq = sequence_arc(F, ARC, MACHINE, threshold=threshold)
    assert check_deliverable(seq, MACHINE) == []
    ref = ref_sequence(F, MACHINE, threshold)
    np.testing.assert_allclose(seq.leaves_mm, ref.leaves_mm, atol=1e-9)
    np.testing.assert_allclose(seq.jaws_mm, ref.jaws_mm, atol=1e-9)
