"""Rule-based VMAT leaf sequencer (AIRT paper, section 5.6): fluence maps -> leaves, jaws and MU.

Conventions
-----------
Leaves. ``ArcSequence.leaves_mm[j, p, 0]`` is the leaf of pair ``p`` on the negative-x side of
the collimator frame (IEC 61217 leaf 1xx, the X1 side, the first ``n_pairs`` values of DICOM
LeafJawPositions), ``[j, p, 1]`` the leaf on the positive-x side (leaf 2xx, X2 side, the last
``n_pairs`` values). The interface calls them bank A and bank B; note that Varian's own
console labels the X1 side "B". Pair 0 is at the most negative y (DICOM leaf order).

Dosimetric leaf gap (DLG). Rounded leaf tips transmit, so a pair at DICOM positions
``(a, b)`` delivers fluence over the *effective* interval ``[a - DLG/2, b + DLG/2]`` (every
pair, closed ones included: a pair closed at the minimum gap inside the jaws leaks a strip
``min_gap + DLG`` wide). The sequencer finds effective apertures in the fluence and places
each leaf DLG/2 inside them (``a = lo + DLG/2``, ``b = hi - DLG/2``);
``sequencing.fluence.fluence_from_sequence`` widens them back, so the two are exact inverses
for every aperture wider than ``min_gap + DLG``.

Apertures (per sector, in parallel). For each BEV row, the largest contiguous run (by summed
fluence) of pixels at or above ``threshold`` x the map's maximum is the row's aperture; the
aperture's MU level is the mean of the run pixels that are not edge pixels of their row
(over all rows; the largest run pixel when no row is wider than two pixels). Each edge is
refined to a sub-pixel position: an edge pixel holding ``f`` x level is open by fraction
``f`` (the leaf sits ``f`` pixels into it); when the edge pixel is fully open, the next pixel
outward (below threshold) gives the fraction by which the leaf has passed the pixel edge.
A row without a run is closed; its leaves wait at the centre of the nearest open row.

Control points. Fluence map ``k`` is delivered between control points ``k`` and ``k + 1``
with the leaves moving linearly, so control point ``j`` carries the mean of the effective
apertures of sectors ``j - 1`` and ``j`` (a closed row next to an open one counts as a
zero-width aperture at the open aperture's centre; the end control points carry the end
sectors). A sector whose apertures barely change is reproduced exactly, sub-pixel edges
included; a changing aperture is smoothed over neighbouring sectors (fidelity is measured by
``tests/test_sequencing.py`` and ``benchmarks/bench_sequencing.py``). Sector ``k`` delivers
``segment_mu[k]`` = its aperture level, clipped to the machine's MU-per-degree bounds.

Jaws. Per control point, X jaws at the outermost effective edges of the open rows widened by
``machine.jaw_margin_mm``; Y jaws at the outer leaf boundaries of the open rows (no margin, so
no closed pair is exposed). Leaf pairs outside the BEV rows are parked closed at x = 0 under
the Y jaws for the whole arc.

Deliverability. Segment ``k`` lasts ``max(dtheta / max gantry speed, MU_k / max dose rate)``;
by default every leaf move is limited to ``max_leaf_speed`` x that time (a forward and a
backward pass towards the targets, averaged; both feasible, so their mean is), which costs
fidelity only where the aperture changes faster than the leaves can follow. With
``allow_gantry_slowdown=True`` leaves go where the apertures want and the delivery system
slows the gantry and dose rate instead (``deliverability.segment_times_s`` gives the time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from core.errors import SequencingError
from core.machine import ArcSpec, MachineModel, RotationDirection
from sequencing import _kernels

logger = logging.getLogger(__name__)

#: Default significance threshold of the aperture search, relative to the map's maximum.
DEFAULT_THRESHOLD = 0.15


@dataclass(frozen=True)
class ArcSequence:
    """A sequenced VMAT arc: what the RT Plan's control points carry.

    Parameters
    ----------
    gantry_deg
        ``(n_cp,)`` control-point gantry angles, degrees in [0, 360); ``n_cp = n_sectors + 1``.
    leaves_mm
        ``(n_cp, n_pairs, 2)`` DICOM leaf positions at the isocenter plane in the collimator
        frame, mm: ``[..., 0]`` the X1-side leaves (1xx), ``[..., 1]`` the X2-side leaves
        (2xx); ``[..., 0] <= [..., 1] - min gap``.
    jaws_mm
        ``(n_cp, 4)`` jaw positions X1, X2, Y1, Y2 (DICOM ASYMX and ASYMY values), mm, with
        ``X1 <= X2`` and ``Y1 <= Y2``.
    cumulative_mu
        ``(n_cp,)`` MU delivered up to each control point: 0 at the first, non-decreasing,
        the beam's total MU at the last.
    collimator_deg
        Collimator angle, degrees in [0, 360).
    direction
        Gantry rotation direction.

    Arrays are stored as read-only float64 copies.
    """

    gantry_deg: NDArray[np.float64]
    leaves_mm: NDArray[np.float64]
    jaws_mm: NDArray[np.float64]
    cumulative_mu: NDArray[np.float64]
    collimator_deg: float
    direction: RotationDirection

    def __post_init__(self) -> None:
        for name in ("gantry_deg", "leaves_mm", "jaws_mm", "cumulative_mu"):
            arr = np.array(getattr(self, name), dtype=np.float64, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        n_cp = self.gantry_deg.shape[0] if self.gantry_deg.ndim == 1 else -1
        if n_cp < 2:
            raise SequencingError(
                f"ArcSequence needs a 1-D gantry_deg of >= 2 control points, got shape {self.gantry_deg.shape}"
            )
        if self.leaves_mm.ndim != 3 or self.leaves_mm.shape[0] != n_cp or self.leaves_mm.shape[2] != 2:
            raise SequencingError(
                f"ArcSequence leaves_mm must have shape ({n_cp}, n_pairs, 2), got {self.leaves_mm.shape}"
            )
        if self.jaws_mm.shape != (n_cp, 4):
            raise SequencingError(f"ArcSequence jaws_mm must have shape ({n_cp}, 4), got {self.jaws_mm.shape}")
        if self.cumulative_mu.shape != (n_cp,):
            raise SequencingError(
                f"ArcSequence cumulative_mu must have shape ({n_cp},), got {self.cumulative_mu.shape}"
            )

    @property
    def n_control_points(self) -> int:
        """Number of control points (``n_sectors + 1``)."""
        return int(self.gantry_deg.shape[0])

    @property
    def total_mu(self) -> float:
        """MU of the whole arc."""
        return float(self.cumulative_mu[-1])

    def segment_mu(self) -> NDArray[np.float64]:
        """MU delivered in each sector (between control points k and k + 1), ``(n_sectors,)``."""
        return np.diff(self.cumulative_mu)


def check_fluence_maps(fluence: NDArray[np.floating], arc: ArcSpec, machine: MachineModel) -> None:
    """Raise SequencingError when fluence maps cannot be sequenced for this arc and machine (by either
    sequencer); the message says how to fix it."""
    if not isinstance(fluence, np.ndarray):
        raise SequencingError(f"fluence must be a numpy array, got {type(fluence).__name__}")
    if fluence.dtype not in (np.float32, np.float64):
        raise SequencingError(f"fluence must be float32 or float64 (MU per pixel), got dtype {fluence.dtype}")
    expected = (arc.n_sectors, machine.bev.n_rows, machine.bev.n_cols)
    if fluence.shape != expected:
        raise SequencingError(
            f"fluence has shape {fluence.shape}; the arc has {arc.n_sectors} sectors and the BEV grid is "
            f"{machine.bev.n_rows} x {machine.bev.n_cols}, so it must be {expected}"
        )
    finite = np.isfinite(fluence)
    if not finite.all():
        k = int(np.argwhere(~finite)[0, 0])
        raise SequencingError(
            f"fluence holds {int((~finite).sum())} NaN/inf values (first in sector {k}); "
            "the planning stage produced an invalid map"
        )
    if fluence.min() < 0:
        k = int(np.argwhere(fluence < 0)[0, 0])
        raise SequencingError(
            f"fluence holds negative MU (min {float(fluence.min()):.3g}, first in sector {k}); "
            "clip the maps at 0 before sequencing"
        )
    if not fluence.max() > 0:
        raise SequencingError("every fluence map is zero: there is nothing to deliver")
    bev = machine.bev
    y_first = machine.leaf_boundaries_mm[machine.first_bev_leaf_pair]
    if abs(y_first + bev.half_height_mm) > 1e-6:
        raise SequencingError(
            f"leaf pair {machine.first_bev_leaf_pair} starts at y = {y_first} mm but BEV row 0 starts at "
            f"{-bev.half_height_mm} mm; set first_bev_leaf_pair so the BEV rows are centred leaf pairs"
        )
    if bev.half_width_mm > machine.max_jaw_mm or bev.half_height_mm > machine.max_jaw_mm:
        raise SequencingError(
            f"the BEV grid ({2 * bev.half_width_mm} x {2 * bev.half_height_mm} mm) is larger than the jaws "
            f"can open (max_jaw_mm = {machine.max_jaw_mm})"
        )
    if machine.min_leaf_gap_mm >= bev.pixel_mm:
        raise SequencingError(
            f"machine min_leaf_gap_mm ({machine.min_leaf_gap_mm}) must be smaller than a BEV pixel ({bev.pixel_mm} mm)"
        )
    if machine.min_mu_per_deg > machine.max_mu_per_deg:
        raise SequencingError(
            f"machine min_mu_per_deg ({machine.min_mu_per_deg}) exceeds max_mu_per_deg ({machine.max_mu_per_deg})"
        )


def allowed_leaf_travel_mm(
    segment_mu: NDArray[np.float64], delta_deg: float, machine: MachineModel
) -> NDArray[np.float64]:
    """Largest leaf move per segment without slowing the gantry below the MU/angle time, mm.

    ``max_leaf_speed x max(delta_deg / max gantry speed, MU / max dose rate)``.
    """
    t = np.maximum(delta_deg / machine.max_gantry_speed_deg_s, segment_mu * 60.0 / machine.max_dose_rate_mu_min)
    return np.asarray(machine.max_leaf_speed_mm_s * t, dtype=np.float64)


def limit_leaf_travel(
    leaves_mm: NDArray[np.float64],
    segment_mu: NDArray[np.float64],
    delta_deg: float,
    machine: MachineModel,
    *,
    mu_headroom: float = 0.0,
) -> NDArray[np.float64]:
    """Leaf positions whose every move keeps within the machine's leaf speed.

    ``leaves_mm`` is ``(n_cp, P, 2)`` (any ``P`` pairs, each gap ``>= min_leaf_gap_mm``); the move of
    segment ``k`` is limited to :func:`allowed_leaf_travel_mm` of ``(1 - mu_headroom) x segment_mu[k]``
    (a forward and a backward pass towards the targets, averaged, gaps kept). Pairs that need no
    limiting come back unchanged.
    """
    travel = allowed_leaf_travel_mm(np.asarray(segment_mu, dtype=np.float64) * (1.0 - mu_headroom), delta_deg,
                                    machine) * (1.0 - 1e-9)
    return np.asarray(_kernels.limit_leaf_travel(np.ascontiguousarray(leaves_mm, dtype=np.float64), travel,
                                                 float(machine.min_leaf_gap_mm)), dtype=np.float64)


def fit_jaws(leaves_mm: NDArray[np.float64], machine: MachineModel) -> NDArray[np.float64]:
    """Jaws ``(n_cp, 4)`` (X1, X2, Y1, Y2, mm) fitted to the open BEV rows of ``(n_cp, n_pairs, 2)`` leaves.

    X jaws at the outermost effective edges of the open rows widened by ``machine.jaw_margin_mm``, Y
    jaws at the outer boundaries of the open rows; a control point without an open row takes the
    jaws of the nearest one that has one.

    Raises
    ------
    SequencingError
        No control point has an open leaf pair.
    """
    bev = machine.bev
    jaws, has_open = _kernels.fit_jaws(
        np.ascontiguousarray(leaves_mm, dtype=np.float64), int(machine.first_bev_leaf_pair), int(bev.n_rows),
        -bev.half_height_mm, float(bev.pixel_mm), float(machine.dosimetric_leaf_gap_mm),
        float(machine.min_leaf_gap_mm), float(machine.jaw_margin_mm), float(machine.max_jaw_mm),
    )
    if not has_open.all():
        idx = np.flatnonzero(has_open)
        if idx.size == 0:
            raise SequencingError("no control point has an open leaf pair; the fluence maps are too weak to deliver")
        nearest = idx[np.abs(np.arange(has_open.size)[:, None] - idx[None, :]).argmin(axis=1)]
        jaws = jaws[nearest]
    return np.asarray(jaws, dtype=np.float64)


def sequence_arc(
    fluence: NDArray[np.floating],
    arc: ArcSpec,
    machine: MachineModel,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    allow_gantry_slowdown: bool = False,
    mu_headroom: float = 0.0,
) -> ArcSequence:
    """Turn the arc's fluence maps into a deliverable leaf, jaw and MU sequence.

    Parameters
    ----------
    fluence
        ``(n_sectors, n_rows, n_cols)`` (180 x 40 x 40 by default) MU per pixel, float32 or
        float64, finite, ``>= 0``, not all zero; map ``k`` is delivered in sector ``k``
        (the convention of ``core.machine``).
    arc
        The arc (angles, direction, number of sectors, collimator).
    machine
        Linac and MLC limits, BEV grid, DLG, jaw margin.
    threshold
        Fraction of each map's maximum at or above which a pixel is part of an aperture,
        in (0, 1); 0.15 by default.
    allow_gantry_slowdown
        False (default): limit each leaf move to what the leaves can do in the segment's
        gantry/MU time, at some cost in fidelity. True: keep the apertures and let the delivery
        system slow the gantry (check with ``check_deliverable(..., allow_gantry_slowdown=True)``).
    mu_headroom
        In [0, 0.5): limit leaf travel as if every segment carried ``1 - mu_headroom`` of its MU,
        so that scaling the plan's MU afterwards (normalisation) by any factor >= ``1 - mu_headroom``
        keeps every leaf within its speed (fewer MU shorten an MU-limited segment).

    Returns
    -------
    ArcSequence
        ``n_sectors + 1`` control points; see the module docstring for the conventions.

    Raises
    ------
    SequencingError
        Bad shape, dtype, NaN/inf, negative or all-zero fluence, or a machine model the
        sequencer cannot serve.
    """
    t0 = time.perf_counter()
    check_fluence_maps(fluence, arc, machine)
    if not 0.0 < threshold < 1.0:
        raise SequencingError(f"aperture threshold must be in (0, 1) of the map maximum, got {threshold}")
    if not 0.0 <= mu_headroom < 0.5:
        raise SequencingError(f"mu_headroom must be in [0, 0.5), got {mu_headroom}")
    bev = machine.bev
    F = np.ascontiguousarray(fluence, dtype=np.float64)
    x0 = -bev.half_width_mm
    dlg = float(machine.dosimetric_leaf_gap_mm)
    gap = float(machine.min_leaf_gap_mm)
    limit = float(machine.max_jaw_mm)

    is_open, lo, hi, level = _kernels.sector_apertures(F, float(threshold), float(bev.pixel_mm), x0)
    _kernels.fill_empty_sectors(level, lo, hi)

    delta_deg = arc.span_deg() / arc.n_sectors
    mu_lo = machine.min_mu_per_deg * delta_deg
    mu_hi = machine.max_mu_per_deg * delta_deg
    seg_mu = np.clip(level, mu_lo, mu_hi)
    n_high = int((level > mu_hi).sum())
    if n_high:
        logger.warning(
            "%d of %d sectors need more than %.3g MU/deg (max %.4g MU); their MU was capped",
            n_high,
            arc.n_sectors,
            machine.max_mu_per_deg,
            float(level.max()),
        )

    bev_leaves = _kernels.control_point_leaves(is_open, lo, hi, dlg, gap, limit)
    leaves = np.empty((arc.n_sectors + 1, machine.n_leaf_pairs, 2), dtype=np.float64)
    leaves[:, :, 0] = -0.5 * gap
    leaves[:, :, 1] = 0.5 * gap
    first = machine.first_bev_leaf_pair
    leaves[:, first : first + bev.n_rows, :] = bev_leaves

    if not allow_gantry_slowdown:
        limited = limit_leaf_travel(leaves, seg_mu, delta_deg, machine, mu_headroom=mu_headroom)
        moved = float(np.abs(limited - leaves).max())
        if moved > 0.0:
            logger.info("leaf travel limited to the machine's leaf speed: largest shift %.2f mm", moved)
        leaves = limited

    jaws = fit_jaws(leaves, machine)

    cumulative = np.concatenate([[0.0], np.cumsum(seg_mu)])
    seq = ArcSequence(
        gantry_deg=arc.control_point_angles_deg(),
        leaves_mm=leaves,
        jaws_mm=jaws,
        cumulative_mu=cumulative,
        collimator_deg=float(arc.collimator_deg),
        direction=arc.direction,
    )
    logger.debug(
        "sequenced %d sectors: %.1f MU in %.1f ms", arc.n_sectors, seq.total_mu, 1e3 * (time.perf_counter() - t0)
    )
    return seq
