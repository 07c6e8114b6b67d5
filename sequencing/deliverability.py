"""Deliverability of a sequenced arc on a machine: limit checks and the delivery time model.

Time model (per segment ``k``, between control points ``k`` and ``k + 1``)::

    t_k = max(dtheta_k / max gantry speed, dMU_k / max dose rate[, max leaf move_k / max leaf speed])

Without the leaf term (the default of ``check_deliverable``) a sequence is deliverable when
every leaf keeps up with the gantry and MU (travel <= max leaf speed x t_k); with it
(``allow_gantry_slowdown=True``) the delivery system may slow gantry and dose rate for the
leaves, and ``segment_times_s`` tells how long that takes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from core.machine import MachineModel, RotationDirection
from sequencing.sequencer import ArcSequence

#: Tolerances: positions (mm) and MU.
_TOL_MM = 1e-6
_TOL_MU = 1e-9


def segment_angles_deg(seq: ArcSequence) -> NDArray[np.float64]:
    """Gantry travel of each segment in the rotation direction, degrees (``(n_sectors,)``)."""
    d = np.diff(seq.gantry_deg)
    if seq.direction is RotationDirection.CC:
        d = -d
    return np.asarray(np.mod(d, 360.0), dtype=np.float64)


def segment_times_s(seq: ArcSequence, machine: MachineModel, *, include_leaves: bool = True) -> NDArray[np.float64]:
    """Duration of each segment under the time model of this module, seconds (``(n_sectors,)``).

    Parameters
    ----------
    seq, machine
        The sequence and the machine's limits.
    include_leaves
        Include the leaf term (the gantry slows down for the leaves); False gives the time
        the gantry and dose rate alone need.
    """
    t = np.maximum(
        segment_angles_deg(seq) / machine.max_gantry_speed_deg_s,
        seq.segment_mu() * 60.0 / machine.max_dose_rate_mu_min,
    )
    if include_leaves:
        travel = np.abs(np.diff(seq.leaves_mm, axis=0)).max(axis=(1, 2))
        t = np.maximum(t, travel / machine.max_leaf_speed_mm_s)
    return np.asarray(t, dtype=np.float64)


def delivery_time_s(seq: ArcSequence, machine: MachineModel) -> float:
    """Beam-on time of the arc (leaf term included), seconds."""
    return float(segment_times_s(seq, machine, include_leaves=True).sum())


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``np.unravel_index`` as plain ints."""
    return tuple(int(v) for v in np.unravel_index(flat, shape))


def _bank(side: int, pair: int) -> str:
    """DICOM-style leaf name: 1xx for the X1 side, 2xx for the X2 side (1-based pair)."""
    return f"{side + 1}{pair + 1:02d}"


def check_deliverable(seq: ArcSequence, machine: MachineModel, *, allow_gantry_slowdown: bool = False) -> list[str]:
    """Human-readable violations of the machine's limits; an empty list means deliverable.

    One message per kind of violation, with the count and the worst case (segment,
    control point, leaf in DICOM 1xx/2xx naming). Checked: shapes against the machine,
    finite values, gantry angles advancing in the rotation direction, cumulative MU (0 at the
    first control point, non-decreasing, > 0 at the end), MU per degree within the machine's
    bounds, minimum leaf gap, leaves and jaws within ``max_jaw_mm`` of the axis, jaw order
    (X1 <= X2, Y1 <= Y2), and leaf speed: every move ``<= max_leaf_speed_mm_s x t_k`` with the
    segment time ``t_k`` of ``segment_times_s`` (leaf term only if ``allow_gantry_slowdown``).

    Parameters
    ----------
    seq
        The sequence to check.
    machine
        The machine it must run on.
    allow_gantry_slowdown
        Let the gantry and dose rate slow down for the leaves (the leaf-speed check then only
        bounds the delivery time, see ``segment_times_s``).
    """
    out: list[str] = []
    n_cp = seq.n_control_points
    n_pairs = machine.n_leaf_pairs
    if seq.leaves_mm.shape != (n_cp, n_pairs, 2):
        return [
            f"leaf positions have shape {seq.leaves_mm.shape}; machine {machine.name!r} needs ({n_cp}, {n_pairs}, 2)"
        ]
    for name in ("gantry_deg", "leaves_mm", "jaws_mm", "cumulative_mu"):
        if not np.isfinite(getattr(seq, name)).all():
            out.append(f"{name} holds NaN or infinite values")
    if out:
        return out

    dtheta = segment_angles_deg(seq)
    if np.any(dtheta <= 0) or dtheta.sum() >= 360.0:
        k = int(np.argmin(dtheta))
        out.append(
            f"gantry angles do not advance {seq.direction.value}: segment {k} moves {dtheta[k]:.3f} deg, "
            f"total {dtheta.sum():.1f} deg (must be > 0 per segment and < 360 in all)"
        )

    cum = seq.cumulative_mu
    seg = np.diff(cum)
    if abs(cum[0]) > _TOL_MU:
        out.append(f"cumulative MU at control point 0 is {cum[0]:.6g}, must be 0")
    if np.any(seg < -_TOL_MU):
        k = int(np.argmin(seg))
        out.append(
            f"cumulative MU decreases in {int((seg < -_TOL_MU).sum())} segments; worst: control point {k} -> {k + 1} "
            f"({cum[k]:.4f} -> {cum[k + 1]:.4f} MU)"
        )
    if not cum[-1] > 0:
        out.append(f"the arc delivers {cum[-1]:.6g} MU; a treatment beam needs > 0")

    with np.errstate(divide="ignore", invalid="ignore"):
        mu_deg = np.where(dtheta > 0, seg / dtheta, np.inf)
    hi = mu_deg > machine.max_mu_per_deg * (1 + 1e-9) + _TOL_MU
    lo = mu_deg < machine.min_mu_per_deg * (1 - 1e-9) - _TOL_MU
    if hi.any():
        k = int(np.argmax(mu_deg))
        out.append(
            f"MU per degree above the machine maximum {machine.max_mu_per_deg} in {int(hi.sum())} segments; "
            f"worst: segment {k} with {mu_deg[k]:.3f} MU/deg"
        )
    if lo.any():
        k = int(np.argmin(mu_deg))
        out.append(
            f"MU per degree below the machine minimum {machine.min_mu_per_deg} in {int(lo.sum())} segments; "
            f"worst: segment {k} with {mu_deg[k]:.3f} MU/deg"
        )

    leaves = seq.leaves_mm
    gaps = leaves[:, :, 1] - leaves[:, :, 0]
    bad = gaps < machine.min_leaf_gap_mm - _TOL_MM
    if bad.any():
        j, p = _index(int(np.argmin(gaps)), gaps.shape)
        out.append(
            f"leaf gap below the minimum {machine.min_leaf_gap_mm} mm at {int(bad.sum())} pair positions; "
            f"worst: control point {j}, pair {p + 1} with {gaps[j, p]:.3f} mm"
        )

    lim = machine.max_jaw_mm + _TOL_MM
    if np.any(np.abs(leaves) > lim):
        j, p, s = _index(int(np.argmax(np.abs(leaves))), leaves.shape)
        out.append(
            f"leaves outside +-{machine.max_jaw_mm} mm at {int((np.abs(leaves) > lim).sum())} positions; worst: "
            f"control point {j}, leaf {_bank(s, p)} at {leaves[j, p, s]:.2f} mm"
        )
    jaws = seq.jaws_mm
    if np.any(np.abs(jaws) > lim):
        j, i = _index(int(np.argmax(np.abs(jaws))), jaws.shape)
        out.append(
            f"jaws outside +-{machine.max_jaw_mm} mm at {int((np.abs(jaws) > lim).sum())} positions; worst: "
            f"control point {j}, {('X1', 'X2', 'Y1', 'Y2')[i]} at {jaws[j, i]:.2f} mm"
        )
    for name, i0, i1 in (("X", 0, 1), ("Y", 2, 3)):
        wrong = jaws[:, i0] > jaws[:, i1] + _TOL_MM
        if wrong.any():
            j = int(np.flatnonzero(wrong)[0])
            out.append(
                f"{name}1 jaw beyond {name}2 at {int(wrong.sum())} control points; first: control point {j} "
                f"({jaws[j, i0]:.2f} > {jaws[j, i1]:.2f} mm)"
            )

    t = segment_times_s(seq, machine, include_leaves=allow_gantry_slowdown)
    travel = np.abs(np.diff(leaves, axis=0))  # (n_sectors, n_pairs, 2)
    allowed = machine.max_leaf_speed_mm_s * t
    excess = travel - allowed[:, None, None]
    bad = excess > _TOL_MM
    if bad.any():
        k, p, s = _index(int(np.argmax(excess)), excess.shape)
        speed = travel[k, p, s] / t[k] if t[k] > 0 else np.inf
        out.append(
            f"leaf speed above {machine.max_leaf_speed_mm_s} mm/s in {int(bad.sum())} leaf moves; worst: segment "
            f"{k} (control point {k} -> {k + 1}), leaf {_bank(s, p)} moves {travel[k, p, s]:.2f} mm "
            f"in {t[k]:.3f} s ({speed:.1f} mm/s); sequence with leaf travel limited, or allow gantry slowdown"
        )
    return out
