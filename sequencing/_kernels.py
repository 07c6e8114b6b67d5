"""Numba kernels of the leaf sequencer (private: call them through ``sequencing.sequencer``).

Every kernel takes and returns plain float64/bool/int64 arrays and scalars; shapes, dtypes
and machine limits are checked by the typed wrappers (``sequence_arc``,
``fluence_from_sequence``) before a kernel runs. Kernels that loop over control points or
sectors are parallel (``prange``); the thread count is Numba's (``numba.set_num_threads``).

Names used below: ``n`` sectors, ``R`` BEV rows (leaf pairs shaping the fluence), ``C`` BEV
columns, ``w`` the pixel size (mm), ``x0`` the x of the left edge of column 0 (mm), ``y0`` the
y of the lower edge of row 0 (mm). An *effective* edge is where the delivered fluence starts or
ends (the DICOM leaf tip widened by half the dosimetric leaf gap).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _largest_run(row: np.ndarray, thr: float) -> tuple[int, int]:
    """Largest (by summed fluence) run of consecutive pixels ``>= thr``; (-1, -1) if none."""
    best_c0 = -1
    best_c1 = -1
    best_sum = -1.0
    c = 0
    n = row.shape[0]
    while c < n:
        if row[c] >= thr:
            c0 = c
            s = 0.0
            while c < n and row[c] >= thr:
                s += row[c]
                c += 1
            if s > best_sum:
                best_sum = s
                best_c0 = c0
                best_c1 = c - 1
        else:
            c += 1
    return best_c0, best_c1


@njit(cache=True)
def _frac(v: float, level: float) -> float:
    """Open fraction of a pixel holding ``v`` MU under an aperture delivering ``level`` MU."""
    f = v / level
    if f < 0.0:
        return 0.0
    if f > 1.0:
        return 1.0
    return f


@njit(cache=True, parallel=True)
def sector_apertures(
    fluence: np.ndarray, threshold: float, w: float, x0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One aperture per sector from its fluence map (paper section 5.6).

    Parameters
    ----------
    fluence
        ``(n, R, C)`` float64, MU per pixel, ``>= 0``.
    threshold
        Significance threshold relative to the map's maximum, in (0, 1).
    w, x0
        Pixel size and left edge of column 0, mm.

    Returns
    -------
    is_open : (n, R) bool
        Whether the row has an aperture in that sector.
    lo, hi : (n, R) float64
        Effective aperture edges, mm; for a closed row ``lo == hi`` is the x where the row's
        closed leaves wait (the centre of the nearest open row, the mean of two at a tie).
    level : (n,) float64
        The aperture's MU (0 for an empty map).
    """
    n, R, C = fluence.shape
    is_open = np.zeros((n, R), dtype=np.bool_)
    lo = np.zeros((n, R), dtype=np.float64)
    hi = np.zeros((n, R), dtype=np.float64)
    level = np.zeros(n, dtype=np.float64)
    for k in prange(n):
        F = fluence[k]
        m = 0.0
        for r in range(R):
            for c in range(C):
                if F[r, c] > m:
                    m = F[r, c]
        if m <= 0.0:
            continue
        thr = threshold * m
        c0s = np.empty(R, dtype=np.int64)
        c1s = np.empty(R, dtype=np.int64)
        s_int = 0.0
        n_int = 0
        s_max = 0.0
        for r in range(R):
            c0, c1 = _largest_run(F[r], thr)
            c0s[r] = c0
            c1s[r] = c1
            if c0 < 0:
                continue
            is_open[k, r] = True
            for c in range(c0 + 1, c1):
                s_int += F[r, c]
                n_int += 1
            for c in range(c0, c1 + 1):
                if F[r, c] > s_max:
                    s_max = F[r, c]
        L = s_int / n_int if n_int > 0 else s_max
        level[k] = L
        for r in range(R):
            c0 = c0s[r]
            c1 = c1s[r]
            if c0 < 0:
                continue
            left_out = F[r, c0 - 1] if c0 > 0 else 0.0
            right_out = F[r, c1 + 1] if c1 < C - 1 else 0.0
            if c0 == c1:
                f = _frac(F[r, c0], L)
                if f < 1.0:
                    ctr = x0 + (c0 + 0.5) * w
                    lo[k, r] = ctr - 0.5 * w * f
                    hi[k, r] = ctr + 0.5 * w * f
                else:
                    lo[k, r] = x0 + c0 * w - w * _frac(left_out, L)
                    hi[k, r] = x0 + (c0 + 1) * w + w * _frac(right_out, L)
                continue
            f = _frac(F[r, c0], L)
            if f < 1.0:
                lo[k, r] = x0 + (c0 + 1) * w - w * f
            else:
                lo[k, r] = x0 + c0 * w - w * _frac(left_out, L)
            f = _frac(F[r, c1], L)
            if f < 1.0:
                hi[k, r] = x0 + c1 * w + w * f
            else:
                hi[k, r] = x0 + (c1 + 1) * w + w * _frac(right_out, L)
        for r in range(R):
            if is_open[k, r]:
                continue
            best = R + 1
            s = 0.0
            cnt = 0
            for q in range(R):
                if not is_open[k, q]:
                    continue
                d = abs(q - r)
                if d < best:
                    best = d
                    s = 0.5 * (lo[k, q] + hi[k, q])
                    cnt = 1
                elif d == best:
                    s += 0.5 * (lo[k, q] + hi[k, q])
                    cnt += 1
            ctr = s / cnt
            lo[k, r] = ctr
            hi[k, r] = ctr
    return is_open, lo, hi, level


@njit(cache=True)
def fill_empty_sectors(level: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Give the rows of empty sectors (level 0) the waiting x of the nearest non-empty sector.

    In place; the earlier sector wins a tie. Sectors stay empty when every sector is empty.
    """
    n, R = lo.shape
    for k in range(n):
        if level[k] > 0.0:
            continue
        best = -1
        for d in range(1, n):
            if k - d >= 0 and level[k - d] > 0.0:
                best = k - d
                break
            if k + d < n and level[k + d] > 0.0:
                best = k + d
                break
        if best < 0:
            return
        for r in range(R):
            ctr = 0.5 * (lo[best, r] + hi[best, r])
            lo[k, r] = ctr
            hi[k, r] = ctr


@njit(cache=True, parallel=True)
def control_point_leaves(
    is_open: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    dlg: float,
    min_gap: float,
    limit: float,
) -> np.ndarray:
    """Nominal (DICOM) leaf positions of the BEV rows at the ``n + 1`` control points.

    Control point ``j`` carries the mean of the effective apertures of its two adjacent
    sectors ``j - 1`` and ``j`` (the first and last control points carry sector 0 and
    ``n - 1``). A closed row next to an open one counts as a zero-width aperture at the open
    aperture's centre, so a row that opens in sector ``j`` is half open at control point ``j``.
    Effective edges become nominal ones by the dosimetric-leaf-gap convention (bank A at
    ``lo + dlg/2``, bank B at ``hi - dlg/2``); a gap below ``min_gap`` is widened to ``min_gap``
    about its centre; positions are clipped to ``[-limit, limit]``.

    Returns
    -------
    (n + 1, R, 2) float64, mm.
    """
    n, R = lo.shape
    out = np.empty((n + 1, R, 2), dtype=np.float64)
    for jj in prange(n + 1):
        j = np.int64(jj)  # the prange index may be unsigned; j - 1 must stay an integer
        for r in range(R):
            sp = j - 1 if j > 0 else np.int64(0)
            sq = j if j < n else np.int64(n - 1)
            op = is_open[sp, r]
            oq = is_open[sq, r]
            if (op and oq) or sp == sq:
                el = 0.5 * (lo[sp, r] + lo[sq, r])
                eh = 0.5 * (hi[sp, r] + hi[sq, r])
            elif op or oq:
                so = sp if op else sq
                mid = 0.5 * (lo[so, r] + hi[so, r])
                el = 0.5 * (lo[so, r] + mid)
                eh = 0.5 * (hi[so, r] + mid)
            else:
                mid = 0.25 * (lo[sp, r] + hi[sp, r] + lo[sq, r] + hi[sq, r])
                el = mid
                eh = mid
            a = el + 0.5 * dlg
            b = eh - 0.5 * dlg
            if b - a < min_gap:
                ctr = 0.5 * (a + b)
                a = ctr - 0.5 * min_gap
                b = ctr + 0.5 * min_gap
            if a < -limit:
                a = -limit
            if b > limit:
                b = limit
            if b - a < min_gap:
                if a <= -limit:
                    b = a + min_gap
                else:
                    a = b - min_gap
            out[j, r, 0] = a
            out[j, r, 1] = b
    return out


@njit(cache=True)
def _step(a_prev: float, b_prev: float, a_t: float, b_t: float, d: float, min_gap: float) -> tuple[float, float]:
    """Move a leaf pair from ``(a_prev, b_prev)`` towards ``(a_t, b_t)`` by at most ``d`` each.

    Keeps ``b - a >= min_gap`` (the previous pair satisfies it, so a solution always exists).
    """
    a = min(max(a_t, a_prev - d), a_prev + d)
    b = min(max(b_t, b_prev - d), b_prev + d)
    if b - a < min_gap:
        half = 0.5 * (min_gap - (b - a))
        a -= half
        b += half
        if a < a_prev - d:
            b += (a_prev - d) - a
            a = a_prev - d
        if b > b_prev + d:
            a -= b - (b_prev + d)
            b = b_prev + d
    return a, b


@njit(cache=True, parallel=True)
def limit_leaf_travel(leaves: np.ndarray, max_travel: np.ndarray, min_gap: float) -> np.ndarray:
    """Positions closest in spirit to ``leaves`` whose moves respect ``max_travel``.

    Per leaf pair, a forward pass (start at control point 0, step towards each target by at
    most the segment's allowed travel) and a backward pass (the same from the last control
    point) each give a feasible sequence (every move ``<= max_travel[k]``, every gap
    ``>= min_gap``); their mean is feasible too (the constraints are convex) and is neither
    late nor early. Pairs that never need limiting come back unchanged.

    Parameters
    ----------
    leaves
        ``(n + 1, P, 2)`` nominal positions, mm, each gap ``>= min_gap``.
    max_travel
        ``(n,)`` largest move of a leaf in segment ``k``, mm, ``>= 0``.
    min_gap
        Minimum gap, mm.
    """
    n1, P, _ = leaves.shape
    out = leaves.copy()
    for p in prange(P):
        need = False
        for k in range(n1 - 1):
            if (
                abs(leaves[k + 1, p, 0] - leaves[k, p, 0]) > max_travel[k]
                or abs(leaves[k + 1, p, 1] - leaves[k, p, 1]) > max_travel[k]
            ):
                need = True
                break
        if not need:
            continue
        fa = np.empty(n1)
        fb = np.empty(n1)
        fa[0] = leaves[0, p, 0]
        fb[0] = leaves[0, p, 1]
        for k in range(n1 - 1):
            fa[k + 1], fb[k + 1] = _step(fa[k], fb[k], leaves[k + 1, p, 0], leaves[k + 1, p, 1], max_travel[k], min_gap)
        ba = np.empty(n1)
        bb = np.empty(n1)
        ba[n1 - 1] = leaves[n1 - 1, p, 0]
        bb[n1 - 1] = leaves[n1 - 1, p, 1]
        for k in range(n1 - 2, -1, -1):
            ba[k], bb[k] = _step(ba[k + 1], bb[k + 1], leaves[k, p, 0], leaves[k, p, 1], max_travel[k], min_gap)
        for k in range(n1):
            out[k, p, 0] = 0.5 * (fa[k] + ba[k])
            out[k, p, 1] = 0.5 * (fb[k] + bb[k])
    return out


@njit(cache=True, parallel=True)
def fit_jaws(
    leaves: np.ndarray,
    first_row: int,
    R: int,
    y0: float,
    w: float,
    dlg: float,
    min_gap: float,
    margin: float,
    limit: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Jaws ``(X1, X2, Y1, Y2)`` per control point fitted to the open BEV rows.

    A row is open when its nominal gap exceeds ``min_gap`` by more than 1 micrometre. X jaws:
    the outermost effective edges of the open rows widened by ``margin``; Y jaws: the outer
    boundaries of the open rows (no margin: past them is a closed leaf pair whose leakage a
    margin would only expose). Clipped to ``[-limit, limit]``.

    Returns
    -------
    jaws : (n + 1, 4) float64
        mm; rows of control points without any open row hold zeros.
    has_open : (n + 1,) bool
        Whether the control point has an open row.
    """
    n1 = leaves.shape[0]
    jaws = np.zeros((n1, 4), dtype=np.float64)
    has_open = np.zeros(n1, dtype=np.bool_)
    for j in prange(n1):
        x1 = np.inf
        x2 = -np.inf
        r_lo = -1
        r_hi = -1
        for r in range(R):
            a = leaves[j, first_row + r, 0]
            b = leaves[j, first_row + r, 1]
            if b - a > min_gap + 1e-3:
                x1 = min(x1, a - 0.5 * dlg)
                x2 = max(x2, b + 0.5 * dlg)
                if r_lo < 0:
                    r_lo = r
                r_hi = r
        if r_lo < 0:
            continue
        has_open[j] = True
        jaws[j, 0] = max(x1 - margin, -limit)
        jaws[j, 1] = min(x2 + margin, limit)
        jaws[j, 2] = max(y0 + r_lo * w, -limit)
        jaws[j, 3] = min(y0 + (r_hi + 1) * w, limit)
    return jaws, has_open


@njit(cache=True)
def _overlap(lo: float, hi: float, p0: float, p1: float) -> float:
    """Length of ``[lo, hi] ∩ [p0, p1]`` (0 when empty)."""
    v = min(hi, p1) - max(lo, p0)
    return v if v > 0.0 else 0.0


@njit(cache=True, parallel=True)
def sequence_fluence(
    leaves: np.ndarray,
    jaws: np.ndarray,
    segment_mu: np.ndarray,
    first_row: int,
    R: int,
    C: int,
    w: float,
    x0: float,
    y0: float,
    dlg: float,
    substeps: int,
) -> np.ndarray:
    """Fluence ``(n, R, C)`` (MU per pixel) delivered by a leaf/jaw sequence.

    Sector ``k`` delivers ``segment_mu[k]`` while leaves and jaws move linearly from control
    point ``k`` to ``k + 1``; at each of ``substeps`` sub-positions ``t = (s + 1/2) / substeps``
    a pixel is open by the fraction of its area inside the effective aperture: x within
    ``[a - dlg/2, b + dlg/2] ∩ [X1, X2]``, y within ``[Y1, Y2]``.
    """
    n = leaves.shape[0] - 1
    out = np.zeros((n, R, C), dtype=np.float64)
    inv_area = 1.0 / (w * w)
    for k in prange(n):
        mu = segment_mu[k] / substeps
        if mu == 0.0:
            continue
        for s in range(substeps):
            t = (s + 0.5) / substeps
            u = 1.0 - t
            X1 = u * jaws[k, 0] + t * jaws[k + 1, 0]
            X2 = u * jaws[k, 1] + t * jaws[k + 1, 1]
            Y1 = u * jaws[k, 2] + t * jaws[k + 1, 2]
            Y2 = u * jaws[k, 3] + t * jaws[k + 1, 3]
            for r in range(R):
                oy = _overlap(Y1, Y2, y0 + r * w, y0 + (r + 1) * w)
                if oy == 0.0:
                    continue
                p = first_row + r
                a = u * leaves[k, p, 0] + t * leaves[k + 1, p, 0] - 0.5 * dlg
                b = u * leaves[k, p, 1] + t * leaves[k + 1, p, 1] + 0.5 * dlg
                lo = max(a, X1)
                hi = min(b, X2)
                if hi <= lo:
                    continue
                c_lo = max(int(np.floor((lo - x0) / w)), 0)
                c_hi = min(int(np.floor((hi - x0) / w)), C - 1)
                scale = mu * oy * inv_area
                for c in range(c_lo, c_hi + 1):
                    ox = _overlap(lo, hi, x0 + c * w, x0 + (c + 1) * w)
                    out[k, r, c] += scale * ox
    return out
