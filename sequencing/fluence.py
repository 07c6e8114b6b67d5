"""Fluence delivered by a leaf sequence (the inverse of the sequencer) and synthetic arc fluence.

``fluence_from_sequence`` is what the dose of a *sequenced* plan is computed from: per sector,
the segment's MU times the time-averaged open fraction of each BEV pixel while leaves and
jaws move linearly between the sector's two control points. The DLG convention is the one of
``sequencing.sequencer``: a pair at DICOM positions ``(a, b)`` is effectively open over
``[a - DLG/2, b + DLG/2]``, clipped by the X jaws; the Y jaws clip the rows. Leaf transmission
and tongue-and-groove are not modelled (the dose engine owns them if at all).

``synthetic_arc_fluence`` makes VMAT-like two-level maps (a rotating projected ellipsoid
target with a posterior notch and a level that varies over the arc) for tests, benchmarks and
demos that have no planner output at hand.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from core.errors import SequencingError
from core.machine import ArcSpec, MachineModel
from sequencing import _kernels
from sequencing.sequencer import ArcSequence


def fluence_from_sequence(seq: ArcSequence, machine: MachineModel, *, substeps: int = 8) -> NDArray[np.float64]:
    """Fluence maps delivered by a sequence, MU per pixel.

    Parameters
    ----------
    seq
        The sequenced arc; its leaf pairs must match ``machine``.
    machine
        Machine model (BEV grid, first BEV leaf pair, DLG).
    substeps
        Sub-positions per sector at which the moving leaves and jaws are sampled (midpoint
        rule, ``t = (s + 1/2) / substeps``), ``>= 1``. Exact for leaves that do not move in
        the sector; the error of a moving edge falls as ``1 / substeps**2``.

    Returns
    -------
    ``(n_sectors, n_rows, n_cols)`` float64 (180 x 40 x 40 by default), MU per pixel, ``>= 0``.

    Raises
    ------
    SequencingError
        ``substeps < 1`` or a sequence whose leaf pairs do not match the machine.
    """
    if substeps < 1:
        raise SequencingError(f"substeps must be >= 1, got {substeps}")
    if seq.leaves_mm.shape[1] != machine.n_leaf_pairs:
        raise SequencingError(
            f"the sequence has {seq.leaves_mm.shape[1]} leaf pairs but machine {machine.name!r} has "
            f"{machine.n_leaf_pairs}; use the machine model the sequence was made for"
        )
    bev = machine.bev
    return np.asarray(
        _kernels.sequence_fluence(
            np.ascontiguousarray(seq.leaves_mm),
            np.ascontiguousarray(seq.jaws_mm),
            np.ascontiguousarray(seq.segment_mu()),
            int(machine.first_bev_leaf_pair),
            int(bev.n_rows),
            int(bev.n_cols),
            float(bev.pixel_mm),
            -bev.half_width_mm,
            -bev.half_height_mm,
            float(machine.dosimetric_leaf_gap_mm),
            int(substeps),
        ),
        dtype=np.float64,
    )


def synthetic_arc_fluence(
    arc: ArcSpec,
    machine: MachineModel,
    *,
    seed: int = 0,
    semi_axes_mm: tuple[float, float, float] = (35.0, 28.0, 40.0),
    mu_per_sector: float = 10.0,
    noise: float = 0.0,
    supersample: int = 5,
) -> NDArray[np.float64]:
    """VMAT-like two-level fluence maps of a prostate-like target, MU per pixel.

    At each sector centre the target (an ellipsoid with lateral, anterior-posterior and
    superior-inferior semi-axes ``semi_axes_mm``) is projected along the beam onto the
    collimator-frame BEV grid (parallel projection, rotated by the collimator angle); a
    notch on the posterior side (rectum sparing) is cut out at oblique-posterior angles. The
    aperture's level varies smoothly over the arc around ``mu_per_sector``. Edge pixels are
    partially open (area fraction from ``supersample`` x ``supersample`` sub-pixels).

    Parameters
    ----------
    arc, machine
        Arc and machine (BEV grid).
    seed
        Random seed of the level modulation phases, the target's offset and the noise.
    semi_axes_mm
        Ellipsoid semi-axes (lateral, AP, SI), mm, each in (0, 100).
    mu_per_sector
        Mean aperture level, MU per sector, > 0.
    noise
        Standard deviation of multiplicative Gaussian noise on open pixels (0 = exact two-level).
    supersample
        Sub-pixels per pixel side for the partial-pixel area, >= 1.

    Returns
    -------
    ``(n_sectors, n_rows, n_cols)`` float64, ``>= 0``.
    """
    rng = np.random.default_rng(seed)
    bev = machine.bev
    a_lat, b_ap, c_si = semi_axes_mm
    offset = rng.uniform(-5.0, 5.0, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    s = supersample
    xs = -bev.half_width_mm + (np.arange(bev.n_cols * s) + 0.5) * bev.pixel_mm / s
    ys = -bev.half_height_mm + (np.arange(bev.n_rows * s) + 0.5) * bev.pixel_mm / s
    X, Y = np.meshgrid(xs, ys)  # (rows*s, cols*s): Y along leaf pairs, X along leaf travel
    col = np.deg2rad(arc.collimator_deg)
    # Patient-frame BEV coordinates (u across the beam in the axial plane, v along SI).
    U = np.cos(col) * X - np.sin(col) * Y
    V = np.sin(col) * X + np.cos(col) * Y
    out = np.empty((arc.n_sectors, bev.n_rows, bev.n_cols), dtype=np.float64)
    for k, g in enumerate(arc.sector_centres_deg()):
        th = np.deg2rad(g)
        half_u = np.sqrt((a_lat * np.cos(th)) ** 2 + (b_ap * np.sin(th)) ** 2)
        inside = ((U - offset[0]) / half_u) ** 2 + ((V - offset[1]) / c_si) ** 2 <= 1.0
        posterior = np.sin(th - np.pi)  # > 0 for beams from posterior-oblique directions
        if abs(posterior) > 0.3:
            side = np.sign(np.cos(th)) if np.cos(th) != 0 else 1.0
            notch = (side * (U - offset[0]) > 0.55 * half_u) & (np.abs(V - offset[1]) < 0.5 * c_si)
            inside &= ~notch
        frac = inside.reshape(bev.n_rows, s, bev.n_cols, s).mean(axis=(1, 3))
        lvl = mu_per_sector * (1.0 + 0.3 * np.sin(2 * th + phase[0]) + 0.1 * np.sin(5 * th + phase[1]))
        out[k] = lvl * frac
    if noise > 0:
        out *= np.clip(1.0 + noise * rng.standard_normal(out.shape), 0.0, None)
    return out
